"""`gemmakit sft`: chat SFT, the loss on the model turns only; optionally distilled from a teacher.

Plain SFT: cross-entropy on the reply tokens (the chat loss mask of chat_data.py).

`--teacher SPEC` (Gemma 2/3's distillation during post-training): on the same reply tokens the loss is
    (1 - alpha) * D(teacher || student) + alpha * CE(the data's tokens)
D is the full-distribution divergence (`--objective full`, default; `--beta` picks it, below) or the
Gemma 3 sampled-logit one (`--objective sampled`, `--k` ids per token, the forward KL over the sample).
The teacher is frozen and runs in inference mode; its vocabulary must contain the student's (a prefix
with the same pieces, as `gemmakit distill` checks). Neither head runs where the mask is 0: the loss
there is not computed at all (losses._kept).

`--on-policy` (GKD: Agarwal et al., 2024, "On-policy distillation of language models"; the Gemma 3
report's "distillation on the student's distribution"): before each micro-batch, the student samples
the last reply of every conversation itself, with gemmakit's engine (batched, at `--temperature`),
from the prompt the data gives (everything before that reply's first token), for at most as many
tokens as the data's reply had, stopping at <end_of_turn>/<eos>. The loss is D on the sampled tokens
only (the data's replies are not used: --alpha must be 0). Sampling seeds follow the data's position,
so a resumed run samples what the uninterrupted one did.

The divergence, `--beta` (GKD's generalized JSD, TRL's convention): 0 forward KL(P_T || P_S), the
default; 1 reverse KL(P_S || P_T); between, JSD(beta). Why forward KL by default: it is the Gemma 2/3
distillation objective itself, so --on-policy changes only which sequences the student learns on, not
what it learns there; it is the one divergence the sampled-k objective can estimate (the teacher's
probabilities are known only at the k sampled ids; reverse KL and JSD need them at every id); and it
is mode-covering, what a student that is to imitate the teacher's full distribution (and sample from
it) wants. GKD found reverse KL / JSD(0.9) better on-policy for some tasks (summarization) and worse
for others: they are one option away (`--beta 1`, `--beta 0.9`). Every D is 0, with a 0 gradient,
when the student's distribution equals the teacher's (tested).
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import torch

from gemmakit.train.chat_data import ChatData
from gemmakit.train.trainer import LossFn

# Distillation options and their values without --teacher (None: "not given").
_DEFAULTS = {"objective": "full", "k": 256, "temperature": 1.0, "alpha": 0.0, "beta": 0.0}


def add_sft_options(p: argparse.ArgumentParser) -> None:
    """--teacher and the distillation options of `gemmakit sft` (named as `gemmakit distill` names them)."""
    if "--teacher" in p._option_string_actions:  # already wired (by cli.py)
        return
    p.add_argument("--teacher", default=None, help="distill from this teacher on the replies: GGUF file, HF directory, "
                   "hub id or `default` (the embedded Gemma 3 270M); its vocabulary must contain the student's "
                   "(default: none, plain SFT)")
    p.add_argument("--objective", choices=("full", "sampled"), default=None,
                   help="with --teacher: full distribution or Gemma 3's sampled logits (default full)")
    p.add_argument("--k", type=int, default=None, help="with --objective sampled: ids sampled per token (default 256)")
    p.add_argument("--temperature", type=float, default=None, help="with --teacher: temperature of both "
                   "distributions, and of the student's sampling with --on-policy (default 1.0)")
    p.add_argument("--alpha", type=float, default=None, help="with --teacher: weight of the data's tokens (cross-entropy) "
                   "against the teacher's distribution, loss = (1 - alpha) KD + alpha CE (default 0.0)")
    p.add_argument("--beta", type=float, default=None, help="with --teacher: the divergence, GKD's generalized JSD: "
                   "0 forward KL(teacher || student), 1 reverse KL, between JSD(beta) (default 0.0)")
    p.add_argument("--on-policy", action="store_true", help="with --teacher: the student samples the replies itself "
                   "(engine, batched) and learns the teacher's distribution on its own samples (GKD)")


def distill_settings(args: argparse.Namespace) -> dict:
    """The distillation settings with their defaults filled in; ValueError for options that need --teacher
    or do not go together (checked before anything loads)."""
    given = [k for k in _DEFAULTS if getattr(args, k, None) is not None] + (["on_policy"] if args.on_policy else [])
    if not args.teacher:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a distillation option: it needs --teacher")
        return {}
    s = {k: getattr(args, k) if getattr(args, k) is not None else d for k, d in _DEFAULTS.items()}
    if s["temperature"] <= 0:
        raise ValueError(f"--temperature must be > 0, got {s['temperature']}")
    if not 0.0 <= s["alpha"] <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {s['alpha']}")
    if not 0.0 <= s["beta"] <= 1.0:
        raise ValueError(f"--beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {s['beta']}")
    if s["objective"] == "sampled" and s["beta"] != 0.0:
        raise ValueError("--objective sampled estimates the forward KL only (--beta 0): the teacher's probabilities "
                         "are known at the k sampled ids, reverse KL and JSD need them at every id")
    if s["objective"] == "sampled" and s["k"] < 1:
        raise ValueError(f"--k must be >= 1, got {s['k']}")
    if args.on_policy and s["alpha"] != 0.0:
        raise ValueError("--on-policy trains on the student's own replies, which have no data tokens: use --alpha 0")
    return {**s, "on_policy": bool(args.on_policy)}


def distill_loss(teacher: torch.nn.Module, s: dict, chunk: int, seed: int) -> LossFn:
    """The loss of `distill_settings` s: a divergence (0 when the student equals the teacher)."""
    from gemmakit.train import distill as D

    if s["objective"] == "sampled":
        return D.online_sampled_loss(teacher, s["k"], s["alpha"], chunk, seed, kl=True)
    return D.online_jsd_loss(teacher, s["beta"], s["temperature"], s["alpha"], chunk)


def last_reply(mask: np.ndarray) -> tuple[int, int]:
    """(start, length) of the last run of 1s in a conversation's loss mask: its last reply, through that
    reply's <end_of_turn>. Raises ValueError for a mask without one."""
    on = np.flatnonzero(mask)
    if len(on) == 0:
        raise ValueError("a conversation without a reply to train on")
    end = int(on[-1]) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end - start


class OnPolicyData:
    """Chat batches whose last replies are the student's own samples (see the module docstring): the
    trainer's data interface (next_batch, state_dict, load_state_dict) over a ChatData."""

    def __init__(self, data: ChatData, model: torch.nn.Module, stop_ids: tuple[int, ...], temperature: float = 1.0,
                 seed: int = 0) -> None:
        if not stop_ids:
            raise ValueError("on-policy sampling needs the tokenizer's <end_of_turn>/<eos> ids to stop at")
        self.data, self.model, self.stop_ids = data, model, tuple(stop_ids)
        self.temperature, self.seed = temperature, seed

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)

    def next_batch(self) -> dict[str, torch.Tensor]:
        where = self.data.state_dict()
        idx = self.data.next_batch()["windows"].tolist()
        rows = self.data.conversations(idx)
        prompts, budgets = [], []
        for convs in rows:
            for ids, mask in convs:
                start, length = last_reply(mask)
                prompts.append(ids[:start].tolist())
                budgets.append(length)
        # One seed per batch from the data's position (and rank): a resumed run draws the same samples.
        seed = int(np.random.SeedSequence([self.seed, where["epoch"], where["pos"], self.data.rank]).generate_state(1)[0])
        samples = iter(self.sample(prompts, budgets, seed))
        new_rows = []
        for convs in rows:
            row = []
            for _ in convs:
                prompt, reply = next(samples)
                row.append((np.asarray(prompt + reply, dtype=np.int64),
                            np.asarray([0] * len(prompt) + [1] * len(reply), dtype=bool)))
            new_rows.append(row)
        return self.data.layout(new_rows, idx)

    def sample(self, prompts: list[list[int]], budgets: list[int], seed: int) -> list[tuple[list[int], list[int]]]:
        """(prompt, the student's reply) per prompt: sampled at self.temperature by engine.generate, in one
        batch, each reply at most its budget of tokens and ending at its first stop id if it reaches one."""
        from gemmakit.engine import generate

        replies: list[list[int]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for step in generate(self.model, prompts, max(budgets), stop_ids=self.stop_ids,
                                 temperature=self.temperature, seed=seed):
                for r, t, n in zip(replies, step, budgets):
                    if t is not None and len(r) < n:
                        r.append(t)
        finally:
            self.model.train(was_training)
        return list(zip(prompts, replies))


def sft(args: argparse.Namespace) -> None:
    """`gemmakit sft` (see the module docstring): checks everything it can before loading, then trains."""
    from gemmakit.train import commands as C
    from gemmakit.train.data import load_meta

    meta = load_meta(args.data)
    if meta.get("format") != "chat":
        raise ValueError(f"{args.data} is plain-text data: prepare conversations with `gemmakit data prepare --chat`")
    if args.seq_len is None:
        args.seq_len = int(meta["seq_len"])
    args.mask_documents = True  # conversations are packed with document masking, always
    settings = distill_settings(args)
    extra = C._run_extra(args, objective="sft", **({"teacher": C._spec_id(args.teacher), "distill": settings}
                                                   if settings else {}))
    C._check_run_dir(args, extra)
    if args.teacher:
        from gemmakit import hub
        from gemmakit.train.distill import check_vocab

        # Both configs before any weights: a teacher that cannot teach this student fails fast.
        student_config, teacher_config = C.model_config(args.model), hub.load_config(args.teacher)
        check_vocab(student_config, teacher_config.vocab_size)
        if settings["objective"] == "sampled" and settings["k"] > student_config.vocab_size:
            raise ValueError(f"--k {settings['k']} must be at most {student_config.vocab_size} (the student's vocabulary)")
    model, tokenizer = C.new_model(args.model, args.seed, C._base_dtype(args))
    if meta.get("generation") not in (None, model.config.generation):
        raise ValueError(f"the data was rendered with Gemma {meta['generation']}'s template, the model is Gemma "
                         f"{model.config.generation}: prepare it with the model's tokenizer")
    loss_fn = wrap = teacher = None
    if args.teacher:
        from gemmakit import hub
        from gemmakit.train.distill import check_pieces

        teacher, teacher_tok = hub.load(args.teacher)
        student_tok = tokenizer or C.data_tokenizer(args.data)
        check_pieces(teacher_tok, student_tok, "teacher's", "student's")
        loss_fn = distill_loss(teacher, settings, args.chunk, args.seed)
        if settings["on_policy"]:  # _fit makes the ChatData, then wrap(data, model)
            wrap = partial(OnPolicyData, stop_ids=student_tok.stop_ids if student_tok is not None else (),
                           temperature=settings["temperature"], seed=args.seed)
    C._fit(args, model, tokenizer, loss_fn=loss_fn, extra=extra, chat=True, wrap_data=wrap, teacher=teacher)
