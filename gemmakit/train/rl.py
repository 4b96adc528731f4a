"""Policy optimization from rewards: RLOO with a KL penalty toward an anchor, WARP's EMA anchor, and BOND.

Each step samples replies to a batch of prompts with gemmakit's engine (one batch, the compiled decode
step for large models), scores them, and takes one gradient step on the policy (LoRA adapters or every
weight). Replies are token ids after the prompt, up to and including the stop token (or the token that
completes a stop string), so the policy also learns where to stop.

RLOO (REINFORCE Leave-One-Out; Kool et al. 2019, Ahmadian et al. 2024, "Back to Basics"): k replies y_1..k
per prompt, each with the KL-regularized reward
    R_i = r(y_i) - kl * (log pi(y_i) - log pi_anchor(y_i))          (sequence log-probs, summed over tokens)
and the mean of the other k-1 rewards as its baseline, A_i = R_i - mean_{j != i} R_j. The loss is
-(1/N) sum_i A_i log pi(y_i) over the N = prompts * k replies (A_i held constant). Its gradient is an
unbiased estimate of the gradient of E[r] - kl * KL(pi || pi_anchor): the baseline does not depend on
y_i, and the KL's own score-function term is exactly what the log-ratio in R_i contributes (tested
on a bandit by enumerating every sample). Log-probs are of the sampling distribution: logits divided by
the temperature (1 by default).

The anchor is the start model (Gemma's "regularized toward the SFT model"), or with anchor_ema = mu an
exponential moving average of the policy, anchor <- (1 - mu) anchor + mu policy after every step (WARP's
first stage, Rame et al. 2024, arXiv 2406.16768). WARP's other stages merge runs: merge.warp.

BOND (Sessa et al. 2024, arXiv 2407.14622; the Gemma 3 report's post-training uses it): match the
best-of-N distribution of an anchor, pi_BoN(y) = pi_a(y) * (F(y)^N - F<(y)^N) / (F(y) - F<(y)), where F(y)
and F<(y) are the anchor's probabilities of a reward <= r(y) and < r(y) (ties broken at random; this is
N F^(N-1) for continuous rewards). The objective is the paper's Jeffreys divergence
    J = (1 - beta) KL(pi_BoN || pi) + beta KL(pi || pi_BoN)         (J-BOND's beta = 0.5)
estimated per prompt with k replies of the policy and k of the anchor:
  forward KL (mode covering): minus the best-of-N log-likelihood of the anchor's replies, each weighted by
    the exact probability that it is the best of N drawn from the k (`best_of_n_weights`: an unbiased
    estimate of E_{pi_BoN}[log pi], not just the best of the k);
  backward KL (mode seeking): RLOO on the policy's replies with the reward log(pi_BoN / pi_a)(y) - (log pi -
    log pi_a)(y); the quantiles F, F< come from the anchor's k rewards (the reply itself counted once, so
    they are never 0; `bond_log_ratio`).
With anchor_ema = 0 the anchor is the start model (BOND toward a fixed best-of-N); with anchor_ema > 0 it
is J-BOND's moving anchor (an EMA of the policy), so the policy keeps distilling the best-of-N of a
slowly improving version of itself. Why this variant: it is the report's objective with its two terms
estimated without bias where that is possible (the forward term exactly, the backward term's quantiles
by a plug-in from k samples), it needs no reward scale (only ranks enter), and on binary rewards (a
check passes or not) the tie-aware formula is the right one (without ties it is the paper's N F^(N-1)).

The loop (`train`) runs the loss micro_batch prompts at a time, each with all its replies (BOND: and
the anchor's), so one forward with autograd gives both the log-probs that enter the advantages (which
are per prompt) and the gradient. It checkpoints like the trainer (checkpoint.py: OUT/checkpoint/,
safetensors and JSON, atomic; exact resume: the trainable weights, optimizer, schedule, EMA anchor, RNG
states and clocks; samples and prompt order depend only on the seed and the step) and writes one JSON
line per step to OUT/log.jsonl.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from gemmakit.engine import generate
from gemmakit.train.losses import chunked_head_loss
from gemmakit.train import checkpoint as ckpt
from gemmakit.train.trainer import (LOG, _stop_on_signals, check_out, check_resume, config_to_dict, lr_lambda,
                                    make_optimizer)

METHODS = ("rloo", "bond")


@dataclass
class RLConfig:
    method: str = "rloo"  # rloo | bond
    steps: int = 100  # optimizer steps, each on fresh samples
    batch_size: int = 8  # prompts per step
    k: int = 4  # replies sampled per prompt (BOND: k from the policy and k from the anchor)
    max_new_tokens: int = 64  # reply length limit in tokens
    temperature: float = 1.0  # sampling temperature (> 0); log-probs are of this tempered policy
    kl: float = 0.05  # RLOO: coefficient of the KL penalty toward the anchor
    anchor_ema: float = 0.0  # 0: the anchor is the start model; mu > 0: anchor <- (1 - mu) anchor + mu policy
    bond_n: int = 4  # BOND: N of the best-of-N distribution (at most k)
    bond_beta: float = 0.5  # BOND: Jeffreys weight of the backward KL (0: forward only, 1: backward only)
    lr: float = 1e-5  # peak learning rate
    min_lr_ratio: float = 1.0  # the cosine decays to lr * min_lr_ratio (1: constant after warmup)
    warmup: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on matrices
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    micro_batch: int = 2  # prompts per forward/backward pass, with their replies (0: all of a step's at once)
    bf16: bool = False  # bf16 autocast for the forward/backward
    chunk: int = 1024  # tokens per chunk of the LM head
    ckpt_every: int = 50  # write a checkpoint every N steps (and at the end)
    eval_every: int = 0  # held-out evaluation every N steps (0: at the start and the end only)
    seed: int = 0  # prompt order and sampling

    def check(self) -> None:
        """ValueError naming the first setting out of range."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "max_new_tokens", "bond_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"--k must be at least 2 (the leave-one-out baseline needs another reply), got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (RL learns from samples), got {self.temperature}")
        if self.kl < 0:
            raise ValueError(f"--kl must be >= 0, got {self.kl}")
        if not 0 <= self.anchor_ema <= 1:
            raise ValueError(f"--anchor-ema must be in [0, 1], got {self.anchor_ema}")
        if not 0 <= self.bond_beta <= 1:
            raise ValueError(f"--bond-beta must be in [0, 1], got {self.bond_beta}")
        if self.method == "bond" and self.bond_n > self.k:
            raise ValueError(f"--bond-n {self.bond_n} exceeds --k {self.k}: the best of N is estimated from k samples")


@dataclass
class Task:
    """What RL needs besides the model: prompts as ids and a reward of replies.

    score(prompt indices, reply ids) -> (total reward [N], {name: values [N]}); cut(reply ids) -> the ids up
    to the token that completes a stop string (None: no stop strings)."""

    prompts: list[list[int]]
    score: Callable[[list[int], list[list[int]]], tuple[Tensor, dict[str, Tensor]]]
    stop_ids: tuple[int, ...] = ()
    cut: Callable[[list[int]], list[int]] | None = None


def encode_prompt(tokenizer, generation: int, record: dict) -> list[int]:
    """A prompt record's ids: "prompt" text as <bos> + plain text (no control tokens, as reward.render
    renders it), or a conversation ("messages", or a "prompt" list) with the chat template's generation
    prompt (`<start_of_turn>model\n`). ValueError for a record with neither."""
    from gemmakit.tokenizer import encode_chat

    messages = record.get("messages", record.get("prompt"))
    if isinstance(messages, list):
        return encode_chat(tokenizer, messages, generation, add_generation_prompt=True)
    if isinstance(messages, str):
        return tokenizer.encode(messages, add_bos=True, parse_special=False)
    raise ValueError('a prompt record needs a "prompt" (text, or a list of messages) or a "messages" list')


def read_prompts(paths: list[str | Path], tokenizer, generation: int) -> tuple[list[dict], list[list[int]]]:
    """(records, their prompt ids) of JSONL prompt files; ValueError naming file:line of a bad record."""
    from gemmakit.train.reward import read_jsonl

    records, prompts = [], []
    for where, record in read_jsonl(paths):
        try:
            prompts.append(encode_prompt(tokenizer, generation, record))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        records.append(record)
    if not records:
        raise ValueError(f"no prompts in {', '.join(map(str, paths))}")
    return records, prompts


def text_task(tokenizer, records: list[dict], prompts: list[list[int]], rewards, stop: tuple[str, ...] = ()) -> Task:
    """A Task whose replies are decoded to text and scored by `rewards` (rewards.Rewards: (records, texts)
    -> (total, parts)). A reply ends at the tokenizer's stop ids or at the first of the `stop` strings:
    its ids are cut after the token that completes the string, its text before the string."""
    def text(ids: list[int]) -> str:
        t = tokenizer.decode(ids)
        for s in stop:
            t = t.split(s, 1)[0]
        return t

    def cut(ids: list[int]) -> list[int]:
        stream, seen = tokenizer.stream(), ""
        for i, t in enumerate(ids):
            seen += stream.push(t)
            if any(s in seen for s in stop):
                return ids[:i + 1]
        return ids

    def score(idx: list[int], replies: list[list[int]]) -> tuple[Tensor, dict[str, Tensor]]:
        return rewards([records[i] for i in idx], [text(r) for r in replies])

    return Task(prompts, score, tokenizer.stop_ids, cut if stop else None)


# -- estimators ---------------------------------------------------------------------------------------

def rloo_advantages(rewards: Tensor) -> Tensor:
    """R_i minus the mean of the other rewards of its prompt: rewards [P, k] -> advantages [P, k] (k >= 2)."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs k >= 2 replies per prompt")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def rloo_coefficients(rewards: Tensor, logp: Tensor, logp_anchor: Tensor, kl: float,
                      n: int | None = None) -> Tensor:
    """Loss weights c [P, k] of -log pi(y): c = A / n with A the leave-one-out advantages of the
    KL-regularized rewards r - kl (log pi - log pi_anchor) (all [P, k]; see the module docstring) and n
    the step's number of replies (default P k: these are all of them)."""
    a = rloo_advantages(rewards - kl * (logp - logp_anchor))
    return a / (n or a.numel())


def best_of_n_weights(rewards: Tensor, n: int) -> Tensor:
    """w [P, k]: the probability that reply i is the one picked as best of n replies drawn without
    replacement from the k of its prompt (ties broken uniformly at random). Each row sums to 1, and
    sum_i w_i f(y_i) is an unbiased estimate of E[f(y)] under the best-of-n distribution of the
    distribution the k replies were sampled from (a U-statistic)."""
    p, k = rewards.shape
    if not 1 <= n <= k:
        raise ValueError(f"best of {n} from {k} replies: need 1 <= n <= k")
    r = rewards.tolist()
    out = torch.zeros(p, k, dtype=torch.float64)
    total = math.comb(k, n)
    for row in range(p):
        for i in range(k):
            below = sum(x < r[row][i] for x in r[row])
            tied = sum(x == r[row][i] for x in r[row]) - 1
            # the other n - 1 of the subset: m ties and n - 1 - m lower replies; i wins with probability 1/(m+1)
            ways = sum(math.comb(tied, m) * math.comb(below, n - 1 - m) / (m + 1) for m in range(min(tied, n - 1) + 1))
            out[row, i] = ways / total
    return out


def bon_log_ratio(le: Tensor, lt: Tensor, n: int) -> Tensor:
    """log(pi_BoN(y) / pi_a(y)) = log((F^n - F<^n) / (F - F<)) for quantiles F = P(r <= r(y)) > F< = P(r < r(y)),
    written as log sum_j F^j F<^(n-1-j) (no cancellation)."""
    return torch.log(sum(le ** j * lt ** (n - 1 - j) for j in range(n)))


def bond_log_ratio(rewards: Tensor, anchor_rewards: Tensor, n: int) -> Tensor:
    """Estimated log(pi_BoN / pi_anchor) of replies with rewards [P, k], the quantiles taken from the
    anchor's rewards [P, m] of the same prompts plus the reply itself (so F > F< always)."""
    a = anchor_rewards[:, None, :]  # [P, 1, m]
    r = rewards[:, :, None]  # [P, k, 1]
    m = anchor_rewards.shape[1]
    le = ((a <= r).sum(-1) + 1).double() / (m + 1)
    lt = (a < r).sum(-1).double() / (m + 1)
    return bon_log_ratio(le, lt, n)


def bond_coefficients(rewards: Tensor, logp: Tensor, logp_anchor: Tensor, anchor_rewards: Tensor, n: int,
                      beta: float, prompts: int | None = None) -> tuple[Tensor, Tensor]:
    """Loss weights of -log pi for (the policy's replies [P, k], the anchor's replies [P, m]) in BOND's
    Jeffreys objective (module docstring): beta * RLOO advantages of log(pi_BoN / pi_a) - log(pi / pi_a)
    over the step's replies, and (1 - beta) * best-of-n weights over the step's prompts (`prompts`,
    default P: these are all of them)."""
    total = prompts or rewards.shape[0]
    rho = bond_log_ratio(rewards, anchor_rewards, n)
    a = rloo_advantages(rho - (logp - logp_anchor).double())
    return beta * a / (total * rewards.shape[1]), (1 - beta) * best_of_n_weights(anchor_rewards, n) / total


# -- log-probs of replies -----------------------------------------------------------------------------

def _layout(prompts: list[list[int]], replies: list[list[int]], device
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Right-padded prompt + reply[:-1] (the last reply token is predicted, never fed): tokens, positions
    (-1 on padding) [N, L], and for every reply token its row (= its sequence), the column that predicts
    it, and its id [n]."""
    seqs = [p + r[:-1] for p, r in zip(prompts, replies)]
    n, length = len(seqs), max(len(s) for s in seqs)
    tokens = torch.zeros(n, length, dtype=torch.long)
    positions = torch.full((n, length), -1, dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (s, p, r) in enumerate(zip(seqs, prompts, replies)):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        positions[i, :len(s)] = torch.arange(len(s))
        rows += [i] * len(r)
        cols += range(len(p) - 1, len(p) - 1 + len(r))
        targets += r
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return tokens.to(device), positions.to(device), t(rows), t(cols), t(targets)


def _check_pairs(prompts: list[list[int]], replies: list[list[int]]) -> None:
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts for {len(replies)} replies")
    if any(not p for p in prompts) or any(not r for r in replies):
        raise ValueError("every prompt and every reply needs at least one token")


def _groups(n: int, size: int) -> list[slice]:
    size = size or n
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def reply_hidden(model: nn.Module, prompts: list[list[int]], replies: list[list[int]], bf16: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Final hidden states [n, d] of the positions that predict the reply tokens (with autograd, unless
    called under no_grad), the reply tokens [n] and their sequence index [n]: one forward of the
    right-padded prompt + reply batch."""
    _check_pairs(prompts, replies)
    device = model.model.embed_tokens.weight.device
    tokens, positions, rows, cols, targets = _layout(prompts, replies, device)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = model.hidden(tokens, positions)[rows, cols]
    return h, targets, rows


@torch.no_grad()
def head_logprobs(model: nn.Module, h: Tensor, targets: Tensor, rows: Tensor, n: int, temperature: float = 1.0,
                  chunk: int = 1024) -> Tensor:
    """Per-sequence sums [n] (fp64) of log softmax(logits / T)[target] over the rows of h [tokens, d]."""
    logp = torch.empty(len(targets), dtype=torch.float32, device=h.device)
    for s in range(0, len(targets), chunk):
        z = model.logits(h[s:s + chunk]).float() / temperature
        logp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None])[:, 0] - torch.logsumexp(z, -1)
    return torch.zeros(n, dtype=torch.float64, device=h.device).index_add_(0, rows, logp.double()).cpu()


def head_nll(model: nn.Module, h: Tensor, targets: Tensor, weights: Tensor, temperature: float = 1.0,
             chunk: int = 1024) -> Tensor:
    """sum_t weights_t * (-log softmax(logits_t / T)[target_t]), differentiable in h and the head. The head
    runs a chunk of tokens at a time with its gradient in closed form (losses.chunked_head_loss), so no
    [tokens x vocab] logits stay alive for the backward."""
    weights = weights.to(device=h.device, dtype=torch.float32)

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        t, w = targets[sl, None], weights[sl]
        z = z / temperature if temperature != 1.0 else z
        top = z.amax(-1, keepdim=True)
        e = (z - top).exp_()
        total = e.sum(-1, keepdim=True)
        loss = (w * ((top + total.log())[:, 0] - z.gather(1, t)[:, 0])).sum()
        if not want_grad:
            return loss, None
        dz = e.div_(total)  # softmax - onehot, times the weight and 1/T (the chain rule through z / T)
        dz.scatter_add_(1, t, torch.full_like(t, -1, dtype=dz.dtype))
        return loss, dz.mul_((w / temperature)[:, None])

    return chunked_head_loss(model, h, fn, chunk)


def sequence_logprobs(model: nn.Module, prompts: list[list[int]], replies: list[list[int]], temperature: float = 1.0,
                      chunk: int = 1024, micro_batch: int = 0, bf16: bool = False) -> Tensor:
    """log pi(reply | prompt) [N] (fp64 sums over the reply's tokens of fp32 log-probs), pi = softmax(logits / T),
    micro_batch sequences per forward (0: all at once)."""
    _check_pairs(prompts, replies)
    out = []
    with torch.no_grad():
        for g in _groups(len(prompts), micro_batch):
            h, targets, rows = reply_hidden(model, prompts[g], replies[g], bf16)
            out.append(head_logprobs(model, h, targets, rows, len(replies[g]), temperature, chunk))
    return torch.cat(out)


# -- models around the policy -------------------------------------------------------------------------

def merged_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the plain (HF) names, LoRA adapters folded in (W + B A scale): the
    weights of the policy it computes. Tensors are the model's own (no copy) except the folded ones."""
    from gemmakit.train.lora import LoRALinear

    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()
             if not any(name.startswith(a + ".") for a in adapted)}  # not base.weight, lora.A, lora.B
    for name, m in adapted.items():
        w = m.base.weight
        state[f"{name}.weight"] = (w.float() + m.lora.delta()).to(w.dtype).detach()
    return state


def plain_copy(model: nn.Module) -> nn.Module:
    """A separate plain Gemma with the weights `model` computes (LoRA folded in), frozen: an anchor."""
    from gemmakit.model import build

    w = model.model.embed_tokens.weight
    out = build(model.config, w.device, w.dtype)
    out.load_state_dict(merged_state(model), strict=True)
    return out.requires_grad_(False).eval()


@torch.no_grad()
def ema_update(anchor: nn.Module, policy: nn.Module, rate: float) -> None:
    """anchor <- (1 - rate) anchor + rate policy, per tensor, in place (WARP's EMA anchor)."""
    state = merged_state(policy)
    for name, a in anchor.state_dict(keep_vars=True).items():
        a.lerp_(state[name].to(a.dtype), rate)


class Sampler:
    """Generation for RL: straight from the model when decoding eagerly; with the compiled step, from one
    plain copy that is loaded with the weights to sample from before each use (the compiled step takes
    plain Linear layers, not LoRA's, and swapping modules into the policy itself would change the
    parameters its optimizer holds)."""

    def __init__(self, compile: bool) -> None:
        self.compile, self.model = compile, None

    def of(self, model: nn.Module) -> nn.Module:
        if not self.compile:
            return model
        if self.model is None:
            self.model = plain_copy(model)
        else:
            self.model.load_state_dict(merged_state(model), strict=True)
        return self.model


def sample(model: nn.Module, prompts: list[list[int]], k: int, max_new_tokens: int, temperature: float,
           seed: int, stop_ids: tuple[int, ...] = (), compile: bool = False,
           cut: Callable[[list[int]], list[int]] | None = None) -> list[list[int]]:
    """k replies per prompt, prompt-major ([p0 x k, p1 x k, ...]), as one batch through engine.generate."""
    batch = [p for p in prompts for _ in range(k)]
    outs: list[list[int]] = [[] for _ in batch]
    for step in generate(model, batch, max_new_tokens, temperature=temperature, seed=seed, stop_ids=stop_ids,
                         compile=compile):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return [cut(o) for o in outs] if cut is not None else outs


def evaluate(model: nn.Module, task: Task, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             batch: int = 32, compile: bool = False) -> dict[str, float]:
    """Mean reward (and each part's mean) of one reply per prompt of `task` (greedy by default), generated
    `batch` prompts at a time; a short last batch is padded with repeats of its last prompt, so every
    batch has one shape (one compiled step serves them all)."""
    total, parts, n = 0.0, {}, len(task.prompts)
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        pad = idx + [idx[-1]] * (batch - len(idx))
        replies = sample(model, [task.prompts[i] for i in pad], 1, max_new_tokens, temperature, seed + start,
                         task.stop_ids, compile, task.cut)[:len(idx)]
        r, p = task.score(idx, replies)
        total += float(r.sum())
        for name, v in p.items():
            parts[name] = parts.get(name, 0.0) + float(v.sum())
    return {"reward": total / n, **{name: v / n for name, v in parts.items()}}


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def prompt_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The prompts of step `step` (0-based): consecutive slices of a seeded permutation per epoch."""
    return [_order(n, seed, g // n)[g % n] for g in range(step * batch, (step + 1) * batch)]


# -- the loop -----------------------------------------------------------------------------------------

def train(policy: nn.Module, task: Task, cfg: RLConfig, out_dir: str | Path, *, anchor: nn.Module,
          start: nn.Module | None = None, eval_task: Task | None = None, compile: bool = False, resume: bool = False,
          overwrite: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Optimize `policy` in place for cfg.steps steps of cfg.method (see the module docstring).

    anchor: the KL anchor / BOND anchor, a plain frozen model (plain_copy of the start); with
    cfg.anchor_ema > 0 it is updated in place as the policy's EMA and `start` (another copy of the start
    model), if given, gives the logged KL to the start. eval_task: held-out prompts, evaluated greedily
    at the start, every cfg.eval_every steps and at the end. Writes out_dir/log.jsonl (one line per step:
    reward, each reward part, kl, loss, lr, grad_norm, elapsed training seconds `time` and the process's
    CPU seconds `cpu` (all threads; a fair clock on a shared machine), evaluations excluded; eval_* on
    evaluation steps) and out_dir/checkpoint/ (every cfg.ckpt_every steps, at the end, on SIGINT/SIGTERM); resume
    continues exactly, with the settings checked against the checkpoint's (trainer.check_resume).
    Returns {"step", "interrupted", "log"}.
    """
    cfg.check()
    out = Path(out_dir)
    check_out(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    opt = make_optimizer(policy, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    step, elapsed, cpu = 0, 0.0, 0.0
    log_path = out / LOG
    if resume:
        state = ckpt.read(out)
        for note in check_resume(state.get("train_config", {}), state.get("extra", {}), cfg, extra):
            print(f"resuming with a changed setting: {note}", file=sys.stderr)
        tensors, _ = ckpt.model_and_optimizer(policy, opt, trainable_only=True)
        if state.get("anchor"):
            tensors.update({f"anchor.{k}": v for k, v in anchor.state_dict().items()})
        ckpt.load_tensors(state, tensors)  # in place: the anchor's tensors are its own
        ckpt.set_model_and_optimizer(policy, opt, tensors, state["optimizer"], trainable_only=True)
        sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(ckpt.read_rank_state(state, 0)["rng"])
        step, elapsed, cpu = state["step"], state["elapsed"], state.get("cpu", 0.0)
        if log_path.exists():  # lines of steps after the checkpoint are redone
            lines = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            log_path.write_text("".join(ln + "\n" for ln in lines))
    else:
        torch.manual_seed(cfg.seed)
        ckpt.remove(out)
        log_path.write_text("")

    def checkpoint() -> None:
        # Only the weights that train (the frozen base is the --model's) and, with an EMA, the anchor.
        tensors, optimizer = ckpt.model_and_optimizer(policy, opt, trainable_only=True)
        if cfg.anchor_ema > 0:
            tensors.update({f"anchor.{k}": v for k, v in anchor.state_dict().items()})
        ckpt.save(out, tensors, {
            "step": step, "elapsed": elapsed, "cpu": cpu, "optimizer": optimizer, "scheduler": sched.state_dict(),
            "anchor": cfg.anchor_ema > 0, "config": config_to_dict(policy.config),
            "train_config": dataclasses.asdict(cfg), "extra": extra or {}}, {"rng": ckpt.rng_state()})

    sampler = Sampler(compile)
    eval_batch = cfg.batch_size * cfg.k  # the training batch's shape: the same compiled step

    def run_eval() -> dict[str, float]:
        res = evaluate(sampler.of(policy), eval_task, cfg.max_new_tokens, 0.0, cfg.seed, eval_batch, compile)
        return {f"eval_{k}": v for k, v in res.items()}

    history: list[dict] = []
    interrupted = None
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.method, unit="step")
    with _stop_on_signals() as stop, open(log_path, "a") as log:
        if eval_task is not None and step == 0:
            rec = {"step": 0, "time": 0.0, "cpu": 0.0, **run_eval()}
            history.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        while step < cfg.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            idx = prompt_indices(len(task.prompts), cfg.batch_size, step, cfg.seed)
            prompts = [task.prompts[i] for i in idx]
            seed = cfg.seed * 1_000_003 + 2 * step
            replies = sample(sampler.of(policy), prompts, cfg.k, cfg.max_new_tokens, cfg.temperature, seed,
                             task.stop_ids, compile, task.cut)
            rep_prompts = [p for p in prompts for _ in range(cfg.k)]
            reward, parts = task.score([i for i in idx for _ in range(cfg.k)], replies)
            k, n, bond = cfg.k, len(replies), cfg.method == "bond"
            rec: dict[str, Any] = {"step": step + 1}
            if bond:
                a_replies = sample(sampler.of(anchor), prompts, k, cfg.max_new_tokens, cfg.temperature, seed + 1,
                                   task.stop_ids, compile, task.cut)
                a_reward, _ = task.score([i for i in idx for _ in range(k)], a_replies)
                rec["anchor_reward"] = float(a_reward.mean())
            group = cfg.micro_batch or cfg.batch_size  # prompts per pass: advantages are per prompt
            logp_a = sequence_logprobs(anchor, rep_prompts, replies, cfg.temperature, cfg.chunk, group * k,
                                       cfg.bf16)
            logp = torch.zeros(n, dtype=torch.float64)
            policy.train()
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for g in _groups(cfg.batch_size, group):
                mine = slice(g.start * k, g.stop * k)  # this group's replies (prompt-major)
                seq_p, seq_r = rep_prompts[mine], replies[mine]
                if bond:
                    seq_p, seq_r = seq_p + seq_p, seq_r + a_replies[mine]
                # one forward with autograd gives the log-probs (for the KL in the rewards) and the loss
                h, targets, rows = reply_hidden(policy, seq_p, seq_r, cfg.bf16)
                m = mine.stop - mine.start
                own = rows < m
                logp[mine] = head_logprobs(policy, h.detach()[own], targets[own], rows[own], m, cfg.temperature,
                                           cfg.chunk)
                shape = (g.stop - g.start, k)
                if bond:
                    c_pol, c_anc = bond_coefficients(reward[mine].view(shape), logp[mine].view(shape),
                                                     logp_a[mine].view(shape), a_reward[mine].view(shape), cfg.bond_n,
                                                     cfg.bond_beta, cfg.batch_size)
                    coef = torch.cat([c_pol.flatten(), c_anc.flatten()])
                else:
                    coef = rloo_coefficients(reward[mine].view(shape), logp[mine].view(shape),
                                             logp_a[mine].view(shape), cfg.kl, n).flatten()
                if bool((coef != 0).any()):  # all k replies alike and no KL: nothing to learn from this group
                    value = head_nll(policy, h, targets, coef.to(h.device)[rows], cfg.temperature, cfg.chunk)
                    value.backward()
                    loss += float(value.detach())
                del h
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            if cfg.anchor_ema > 0:
                ema_update(anchor, policy, cfg.anchor_ema)
            step += 1
            rec.update(reward=float(reward.mean()), **{name: float(v.mean()) for name, v in parts.items()},
                       kl=float((logp - logp_a).mean()), loss=loss, lr=lr, grad_norm=float(gnorm),
                       reply_tokens=sum(map(len, replies)) / len(replies))
            if start is not None:
                logp_s = sequence_logprobs(start, rep_prompts, replies, cfg.temperature, cfg.chunk, group * k,
                                           cfg.bf16)
                rec["kl_start"] = float((logp - logp_s).mean())
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            rec.update(time=round(elapsed, 3), cpu=round(cpu, 3))
            if eval_task is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                rec.update(run_eval())
            history.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl']:.3f}")
            if stop["signal"] or step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
            if stop["signal"]:
                interrupted = stop["signal"]
                break
    bar.close()
    return {"step": step, "interrupted": interrupted, "log": history}


def anchors(policy: nn.Module, ema: bool) -> tuple[nn.Module, nn.Module | None]:
    """(anchor, start) for `train`, copied from the policy before training: the anchor; with an EMA
    anchor also a fixed copy of the start, for the KL to the start (else None: the anchor is the start)."""
    anchor = plain_copy(policy)
    return anchor, (copy.deepcopy(anchor) if ema else None)
