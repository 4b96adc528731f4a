"""The RL commands: `gemmakit reward train | score | pairs`, `gemmakit rl train | eval`, `gemmakit warm`,
`gemmakit warp`. Each checks its options and paths before loading any model; `add_parsers` registers them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from gemmakit.train.rl import RLConfig
from gemmakit.train.trainer import CHECKPOINT, TrainConfig, check_out, check_resume, saved_settings

DEFAULT = "`default` (the embedded Gemma 3 270M)"


def _spec_id(spec: str | None) -> str | None:
    from gemmakit.train.commands import _spec_id as spec_id

    return spec_id(spec)


def _files(paths: list[str], what: str) -> list[str]:
    """Absolute paths of existing files (a missing one, or a directory, is named)."""
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a {what}")
        if not path.is_file():
            raise FileNotFoundError(f"no such {what}: {path}")
        out.append(str(path.resolve()))
    return out


def _tokenizer_and_generation(spec: str | None):
    """(tokenizer, generation) of a model SPEC or reward model directory, without loading weights."""
    from gemmakit import hub
    from gemmakit.train.commands import load_tokenizer

    return load_tokenizer(spec), hub.load_config(spec).generation


def _check_run(out: str, resume: bool, overwrite: bool, cfg, extra: dict) -> None:
    """Before loading anything: refuse to overwrite a run, or to resume one with other settings."""
    check_out(out, resume, overwrite)
    if resume:
        saved_cfg, saved_extra = saved_settings(Path(out) / CHECKPOINT)
        check_resume(saved_cfg, saved_extra, cfg, extra)


def _reward_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--reward", action="append", required=required, default=None, metavar="SPEC",
                   help="a reward (repeatable, added up): exact (the reply's first number equals the record's "
                        "\"answer\"), command:CMD (CMD gets the reply on stdin and the record as JSON in "
                        "$GEMMAKIT_RECORD, runs without network and with --reward-timeout; scores the number on its "
                        "last stdout line, else 1 for exit status 0, 0 otherwise), python:MODULE_OR_FILE.py:FUNCTION "
                        "(FUNCTION(record, reply) -> float), model:DIR (a reward model's score)")
    p.add_argument("--reward-weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per --reward, in order (default 1 each)")
    p.add_argument("--reward-timeout", type=float, default=10.0, help="seconds before a reward command is killed "
                   "and scores 0 (default 10.0)")
    p.add_argument("--reward-workers", type=int, default=4, help="reward commands run at once (default 4)")
    p.add_argument("--reward-network", action="store_true", help="let reward commands use the network (default: "
                   "each runs in a network namespace of its own, `unshare --net`; without one gemmakit refuses)")


def _rewards(args: argparse.Namespace):
    from gemmakit.train import rewards

    return rewards.build(args.reward, args.reward_weights, timeout=args.reward_timeout, network=args.reward_network,
                         workers=args.reward_workers)


def _check_rewards(args: argparse.Namespace) -> None:
    from gemmakit.train.rewards import check_spec

    if args.reward_weights is not None and len(args.reward_weights) != len(args.reward):
        raise ValueError(f"--reward-weights has {len(args.reward_weights)} values for {len(args.reward)} rewards")
    for spec in args.reward:
        check_spec(spec)


def _generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop", action="append", default=None, metavar="STRING",
                   help="end replies at this string (repeatable; besides <eos> and <end_of_turn>), e.g. "
                        "--stop $'\\n' for one-line answers (default: none)")


def _check_stop(stop: list[str] | None) -> tuple[str, ...]:
    if any(not s for s in stop or ()):
        raise ValueError("--stop needs a non-empty string")
    return tuple(stop or ())


# -- reward train / score / pairs ---------------------------------------------------------------------

_REWARD_TRAIN = ("steps", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip", "bf16",
                 "activation_checkpointing", "ckpt_every", "seed")


def _add_reward_train(p: argparse.ArgumentParser) -> None:
    from gemmakit.train.commands import _HELP

    p.add_argument("--model", default=None, help=f"model to start from: a reward model directory (continued), or a "
                   f"language model (a new score head): GGUF file, HF directory, hub id or {DEFAULT}, the default")
    p.add_argument("--data", nargs="+", required=True, help="JSONL preference pairs: {\"prompt\" or \"messages\", "
                   "\"chosen\", \"rejected\"} per line")
    p.add_argument("--val-data", nargs="+", default=None, help="held-out pairs (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out by a hash of their prompt "
                   "(default 0.1; ignored with --val-data)")
    p.add_argument("--max-len", type=int, default=512, help="pairs with a side longer than this many tokens are "
                   "dropped and counted (default 512)")
    p.add_argument("--out", required=True, help="run directory: checkpoint/, log.jsonl, model/ (the reward model)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank and the score head only "
                   "(default 0: every weight); merged into OUT/model")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (default 16.0)")
    defaults = {**dataclasses.asdict(TrainConfig()), "steps": 200, "batch_size": 8, "lr": 1e-4, "warmup": 10,
                "weight_decay": 0.0}
    for name in _REWARD_TRAIN:
        flag = "--" + name.replace("_", "-")
        help = _HELP[name] if name != "batch_size" else "preference pairs per micro-batch"
        if isinstance(defaults[name], bool):
            p.add_argument(flag, action="store_true", help=f"{help} (default: off)")
        else:
            p.add_argument(flag, type=type(defaults[name]), default=defaults[name],
                           help=f"{help} (default {defaults[name]})")


def reward_train_cmd(args: argparse.Namespace) -> None:
    """`gemmakit reward train`: Bradley-Terry training of a reward model on preference pairs."""
    from gemmakit.train import reward as R
    from gemmakit.train.parallel import apply_activation_checkpointing, full_model, init_distributed, shard
    from gemmakit.train.trainer import train

    if args.steps < 1 or args.batch_size < 1 or args.max_len < 2:
        raise ValueError("--steps and --batch-size must be at least 1, --max-len at least 2")
    data = _files(args.data, "JSONL file")
    val_files = _files(args.val_data, "JSONL file") if args.val_data else None
    cfg = TrainConfig(**{n: getattr(args, n) for n in _REWARD_TRAIN}, seq_len=args.max_len)
    extra = {"objective": "bradley_terry", "model": _spec_id(args.model), "data": data, "val_data": val_files,
             "val_fraction": args.val_fraction, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}
    _check_run(args.out, args.resume, args.overwrite, cfg, extra)
    tok, generation = _tokenizer_and_generation(args.model)
    pairs, dropped = R.read_pairs(data, tok, generation, args.max_len)
    if val_files:
        train_pairs = [(c, r) for c, r, _ in pairs]
        val_pairs = [(c, r) for c, r, _ in R.read_pairs(val_files, tok, generation, args.max_len)[0]]
    else:
        train_pairs, val_pairs = R.split_pairs(pairs, args.val_fraction)
    model, tokenizer = R.load_for_training(args.model)
    if args.lora_rank:
        from gemmakit.train.lora import apply_lora

        apply_lora(model, args.lora_rank, args.lora_alpha, generator=torch.Generator().manual_seed(args.seed))
        model.score.requires_grad_(True)  # the head is new: it trains in full
    rank, world = init_distributed()
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if world > 1:
        shard(model, bf16=cfg.bf16)  # the score head is in the root group, gathered with the final norm
    if args.overwrite and rank == 0:
        shutil.rmtree(Path(args.out) / "model", ignore_errors=True)
    res = train(model, R.PairData(train_pairs, args.batch_size, args.seed, rank=rank, world=world), cfg, args.out,
                loss_fn=R.pair_loss, resume=args.resume, extra_state=extra, rank=rank, overwrite=args.overwrite)
    if not res["interrupted"]:  # (the ranks agree on it) gathered to rank 0 under FSDP2
        model = full_model(model, lambda: _plain_reward_model(model.config, args))
    if rank != 0:
        return
    if res["interrupted"]:
        print(f"stopped by {res['interrupted']} at step {res['step']}; checkpoint saved in {args.out}; continue with "
              f"--resume", file=sys.stderr)
        return
    if args.lora_rank:
        from gemmakit.train.lora import merge_lora

        merge_lora(model)
    out = R.save_reward_model(model, Path(args.out) / "model", tokenizer)
    held = R.evaluate_pairs(model, val_pairs)
    report = {"step": res["step"], "loss": res["log"][-1]["loss"] if res["log"] else None,
              "train_pairs": len(train_pairs),
              "dropped_too_long": dropped, "val_pairs": held["pairs"], "val_accuracy": held["accuracy"],
              "val_loss": held["loss"], "val_margin": held["margin"], "model": str(out)}
    (Path(args.out) / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report))


def _plain_reward_model(config, args: argparse.Namespace) -> torch.nn.Module:
    """An unsharded reward model of the trained one's structure (LoRA adapters too) on the CPU, to load into."""
    from gemmakit.train.reward import RewardModel

    plain = RewardModel(config)
    if args.lora_rank:
        from gemmakit.train.lora import apply_lora

        apply_lora(plain, args.lora_rank, args.lora_alpha)
    return plain


def reward_score_cmd(args: argparse.Namespace) -> None:
    """`gemmakit reward score`: pairwise accuracy on preference pairs, or one score per completion."""
    from gemmakit.train import reward as R

    data = _files(args.data, "JSONL file")
    records = R.read_jsonl(data)  # a bad line fails before the model loads
    pairs = all("chosen" in r and "rejected" in r for _, r in records)
    if not pairs:
        for where, r in records:
            if "completion" not in r:
                raise ValueError(f"{where}: give preference pairs (\"chosen\", \"rejected\") or completions to score "
                                 f"(\"prompt\" or \"messages\", and \"completion\")")
    model, tok = R.load_scorer(args.model)
    gen = model.config.generation
    if pairs:
        ids, _ = R.read_pairs(data, tok, gen)
        print(json.dumps(R.evaluate_pairs(model, [(c, r) for c, r, _ in ids], args.batch_size)))
        return
    seqs = []
    for where, r in records:
        try:
            seqs.append(R.render(tok, gen, r, r["completion"]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    for s in R.score(model, seqs, args.batch_size).tolist():
        print(json.dumps({"score": s}))


def reward_pairs_cmd(args: argparse.Namespace) -> None:
    """`gemmakit reward pairs`: preference pairs from a model's own samples, ranked by rewards."""
    from gemmakit import hub
    from gemmakit.train import rl

    if args.k < 2 or args.max_new_tokens < 1 or args.temperature <= 0 or args.batch_size < 1:
        raise ValueError("--k must be at least 2, --max-new-tokens and --batch-size at least 1, --temperature > 0")
    _check_rewards(args)
    stop = _check_stop(args.stop)
    prompts_files = _files(args.prompts, "JSONL file")
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise ValueError(f"{out} is a directory, not a JSONL file to write")
    model, tok = hub.load(args.model)
    records, prompts = rl.read_prompts(prompts_files, tok, model.config.generation)
    task = rl.text_task(tok, records, prompts, _rewards(args), stop)
    from gemmakit.cli import _compile

    compile = _compile(args, model)
    lines, n_replies, total = [], 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        idx = list(range(start, min(start + args.batch_size, len(prompts))))
        pad = idx + [idx[-1]] * (args.batch_size - len(idx))  # one batch shape: one compiled step
        replies = rl.sample(model, [prompts[i] for i in pad], args.k, args.max_new_tokens, args.temperature,
                            args.seed + start, task.stop_ids, compile, task.cut)[:len(idx) * args.k]
        rep_idx = [i for i in idx for _ in range(args.k)]
        reward, _ = task.score(rep_idx, replies)
        texts = [tok.decode(r) for r in replies]
        for s in stop:
            texts = [t.split(s, 1)[0] for t in texts]
        n_replies += len(replies)
        total += float(reward.sum())
        for j, i in enumerate(idx):
            group = range(j * args.k, (j + 1) * args.k)
            seen = set()
            for a in group:
                for b in group:
                    if reward[a] > reward[b] and (texts[a], texts[b]) not in seen:
                        seen.add((texts[a], texts[b]))
                        prompt = {k: records[i][k] for k in ("prompt", "messages") if k in records[i]}
                        pair = {**prompt, "chosen": texts[a], "rejected": texts[b],
                                "chosen_reward": float(reward[a]), "rejected_reward": float(reward[b])}
                        lines.append(json.dumps(pair, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(ln + "\n" for ln in lines))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(json.dumps({"prompts": len(prompts), "replies": n_replies, "mean_reward": total / max(n_replies, 1),
                      "pairs": len(lines), "out": str(out)}))


# -- rl train / eval ----------------------------------------------------------------------------------

_RL_HELP = {
    "method": "rloo (REINFORCE leave-one-out with a KL penalty) or bond (best-of-N distillation, Jeffreys divergence)",
    "steps": "optimizer steps, each on fresh samples", "batch_size": "prompts per step",
    "k": "replies sampled per prompt (bond: from the policy and from the anchor each)",
    "max_new_tokens": "reply length limit in tokens", "temperature": "sampling temperature (> 0)",
    "kl": "rloo: coefficient of the KL penalty toward the anchor",
    "anchor_ema": "0: the anchor is the start model; mu > 0: an EMA of the policy, anchor <- (1 - mu) anchor + mu "
                  "policy (WARP; bond: J-BOND's moving anchor)",
    "bond_n": "bond: N of the best-of-N target (at most k)", "bond_beta": "bond: weight of the backward KL in the "
    "Jeffreys divergence (0: forward only, 1: backward only)",
    "lr": "peak learning rate", "min_lr_ratio": "final lr / peak lr (cosine)", "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay", "clip": "gradient norm clip (0: off)",
    "micro_batch": "prompts per forward/backward, with their replies (0: all of a step's; memory grows with it)",
    "bf16": "bf16 autocast",
    "chunk": "tokens per LM-head chunk", "ckpt_every": "checkpoint every N steps",
    "eval_every": "held-out evaluation every N steps (0: at the start and the end)",
    "seed": "prompt order and sampling",
}


def _add_rl_train(p: argparse.ArgumentParser) -> None:
    from gemmakit.cli import _add_compile_arg

    p.add_argument("--model", default=None, help=f"the start policy (and anchor): GGUF file, HF directory, hub id or "
                   f"{DEFAULT}, the default")
    p.add_argument("--prompts", nargs="+", required=True, help="JSONL prompts: {\"prompt\": text} (continued as "
                   "raw text) or {\"messages\": [...]} (chat template), plus what the rewards read (e.g. \"answer\")")
    p.add_argument("--eval-prompts", nargs="+", default=None, help="held-out JSONL prompts, scored greedily at the "
                   "start, every --eval-every steps and at the end (default: none)")
    p.add_argument("--out", required=True, help="run directory: checkpoint/, log.jsonl, model/ (and adapter/)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (default 0: every "
                   "weight); merged into OUT/model, and saved in PEFT's format in OUT/adapter")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (default 16.0)")
    _reward_options(p)
    _generation_options(p)
    _add_compile_arg(p)
    for f in dataclasses.fields(RLConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "method":
            p.add_argument(flag, choices=("rloo", "bond"), default=f.default,
                           help=f"{_RL_HELP[f.name]} (default {f.default})")
        elif isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=f"{_RL_HELP[f.name]} (default: off)")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default,
                           help=f"{_RL_HELP[f.name]} (default {f.default})")


def rl_train_cmd(args: argparse.Namespace) -> None:
    """`gemmakit rl train`: RLOO or BOND on JSONL prompts with the given rewards; OUT/model at the end."""
    from gemmakit import hub, weights
    from gemmakit.train import rl

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("gemmakit rl train runs in one process, not under torchrun: each step samples with the "
                         "engine's compiled decode, which needs the whole policy in one process")
    cfg = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    cfg.check()
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    _check_rewards(args)
    stop = _check_stop(args.stop)
    prompts_files = _files(args.prompts, "JSONL file")
    eval_files = _files(args.eval_prompts, "JSONL file") if args.eval_prompts else None
    extra = {"model": _spec_id(args.model), "prompts": prompts_files, "rewards": args.reward,
             "reward_weights": args.reward_weights, "stop": list(stop), "lora_rank": args.lora_rank,
             "lora_alpha": args.lora_alpha}
    _check_run(args.out, args.resume, args.overwrite, cfg, extra)
    policy, tok = hub.load(args.model)
    gen = policy.config.generation
    records, prompts = rl.read_prompts(prompts_files, tok, gen)
    rewards = _rewards(args)
    task = rl.text_task(tok, records, prompts, rewards, stop)
    eval_task = rl.text_task(tok, *rl.read_prompts(eval_files, tok, gen), rewards, stop) if eval_files else None
    anchor, start = rl.anchors(policy, ema=cfg.anchor_ema > 0)
    if args.lora_rank:
        from gemmakit.train.lora import apply_lora

        apply_lora(policy, args.lora_rank, args.lora_alpha, generator=torch.Generator().manual_seed(cfg.seed))
    from gemmakit.cli import _compile

    if args.overwrite:
        for name in ("model", "adapter"):
            shutil.rmtree(Path(args.out) / name, ignore_errors=True)
    res = rl.train(policy, task, cfg, args.out, anchor=anchor, start=start, eval_task=eval_task,
                   compile=_compile(args, policy), resume=args.resume, overwrite=args.overwrite, extra=extra)
    if res["interrupted"]:
        print(f"stopped by {res['interrupted']} at step {res['step']}; checkpoint saved in {args.out}; continue with "
              f"--resume", file=sys.stderr)
        return
    report = {"step": res["step"]}
    if args.lora_rank:
        from gemmakit.train.lora import merge_lora, save_adapter

        if policy.config.vision is None:
            report["adapter"] = str(save_adapter(policy, Path(args.out) / "adapter", _spec_id(args.model)))
        merge_lora(policy)
    report["model"] = str(weights.save(policy, Path(args.out) / "model", tokenizer=tok))
    last = res["log"][-1] if res["log"] else {}
    report.update({k: v for k, v in last.items() if k not in ("step", "lr", "grad_norm", "loss")})
    print(json.dumps(report))


def rl_eval_cmd(args: argparse.Namespace) -> None:
    """`gemmakit rl eval`: mean rewards of a model's replies to held-out prompts, and its KL to a base."""
    from gemmakit import hub
    from gemmakit.train import rl

    if args.max_new_tokens < 1 or args.temperature < 0 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be at least 1, --temperature >= 0")
    _check_rewards(args)
    stop = _check_stop(args.stop)
    prompts_files = _files(args.prompts, "JSONL file")
    model, tok = hub.load(args.model)
    records, prompts = rl.read_prompts(prompts_files, tok, model.config.generation)
    task = rl.text_task(tok, records, prompts, _rewards(args), stop)
    from gemmakit.cli import _compile

    compile = _compile(args, model)
    res = {"prompts": len(prompts), **rl.evaluate(model, task, args.max_new_tokens, args.temperature, args.seed,
                                                  args.batch_size, compile)}
    if args.kl_base:
        # KL(model || base) on replies the model samples at temperature 1 (one per prompt).
        replies = []
        for start in range(0, len(prompts), args.batch_size):
            idx = list(range(start, min(start + args.batch_size, len(prompts))))
            pad = idx + [idx[-1]] * (args.batch_size - len(idx))
            replies += rl.sample(model, [prompts[i] for i in pad], 1, args.max_new_tokens, 1.0, args.seed + start,
                                 task.stop_ids, compile, task.cut)[:len(idx)]
        base, _ = hub.load(args.kl_base)
        lp = rl.sequence_logprobs(model, prompts, replies)
        res["kl_to_base"] = float((lp - rl.sequence_logprobs(base, prompts, replies)).mean())
    print(json.dumps(res))


# -- WARM / WARP --------------------------------------------------------------------------------------

def warm_cmd(args: argparse.Namespace) -> None:
    """`gemmakit warm`: WARM, the weight average of reward models fine-tuned from one init."""
    from gemmakit.train import merge
    from gemmakit.train.reward import is_reward_model

    for m in args.models:
        if not is_reward_model(Path(m).expanduser()):
            raise ValueError(f"{m} is not a reward model directory (its config.json names no "
                             f"*ForSequenceClassification architecture)")
    out = merge.merge(args.models, args.out, "average", args.weights)
    print(json.dumps({"method": "warm", "models": len(args.models), "out": str(out)}))


def warp_cmd(args: argparse.Namespace) -> None:
    """`gemmakit warp`: WARP's SLERP of RL runs' task vectors, then interpolation toward the init."""
    from gemmakit import hub
    from gemmakit.train import merge

    base = str(hub.default_checkpoint()) if hub.is_default(args.base) else args.base
    out = merge.warp(args.models, base, args.out, args.eta, args.weights)
    print(json.dumps({"method": "warp", "models": len(args.models), "eta": args.eta, "out": str(out)}))


# -- registration -------------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    """`reward`, `rl`, `warm` and `warp` on the gemmakit command's subparsers."""
    from gemmakit.cli import _add_compile_arg

    group = sub.add_parser("reward", help="reward models: train on preference pairs, score, make pairs from samples")
    rsub = group.add_subparsers(dest="reward_command", required=True)
    s = rsub.add_parser("train", help="train a reward model on preference pairs (Bradley-Terry)")
    _add_reward_train(s)
    s.set_defaults(func=reward_train_cmd)
    s = rsub.add_parser("score", help="a reward model's pairwise accuracy on pairs, or its score of each completion")
    s.add_argument("--model", required=True, help="reward model directory")
    s.add_argument("--data", nargs="+", required=True, help="JSONL: preference pairs, or {\"prompt\" or \"messages\", "
                   "\"completion\"} per line")
    s.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    s.set_defaults(func=reward_score_cmd)
    s = rsub.add_parser("pairs", help="preference pairs from a model's own samples, ranked by rewards")
    s.add_argument("--model", default=None, help=f"model to sample: GGUF file, HF directory, hub id or {DEFAULT}")
    s.add_argument("--prompts", nargs="+", required=True, help="JSONL prompts (as for `rl train`)")
    s.add_argument("--out", required=True, help="JSONL file to write: every pair of distinct replies to a prompt "
                   "whose rewards differ, the better one as \"chosen\"")
    s.add_argument("--k", type=int, default=4, help="replies per prompt (default 4)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    s.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    s.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default 8)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _reward_options(s)
    _generation_options(s)
    _add_compile_arg(s)
    s.set_defaults(func=reward_pairs_cmd)

    group = sub.add_parser("rl", help="reinforcement learning from rewards: RLOO, BOND; evaluation")
    rsub = group.add_subparsers(dest="rl_command", required=True)
    s = rsub.add_parser("train", help="optimize a policy with RLOO or BOND against rewards, KL-anchored")
    _add_rl_train(s)
    s.set_defaults(func=rl_train_cmd)
    s = rsub.add_parser("eval", help="mean rewards of a model's replies to prompts (greedy by default)")
    s.add_argument("--model", default=None, help=f"model: GGUF file, HF directory, hub id or {DEFAULT}")
    s.add_argument("--prompts", nargs="+", required=True, help="JSONL prompts (as for `rl train`)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0.0)")
    s.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (default 32)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--kl-base", default=None, metavar="SPEC", help="also estimate KL(model || SPEC) on one reply per "
                   "prompt sampled at temperature 1 (e.g. the start of training; default: none)")
    _reward_options(s)
    _generation_options(s)
    _add_compile_arg(s)
    s.set_defaults(func=rl_eval_cmd)

    s = sub.add_parser("warm", help="WARM: average reward models fine-tuned from one init")
    s.add_argument("models", nargs="+", help="reward model directories (same architecture)")
    s.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per model (default equal)")
    s.add_argument("--out", required=True, help="output reward model directory")
    s.set_defaults(func=warm_cmd)
    s = sub.add_parser("warp", help="WARP: SLERP of RL runs' task vectors, then interpolation toward the init")
    s.add_argument("models", nargs="+", help="policies RL-tuned from --base (HF directories, e.g. runs/*/model)")
    s.add_argument("--base", required=True, help="their init: an HF directory or `default`")
    s.add_argument("--eta", type=float, default=0.5, help="interpolation toward the init: base + eta (SLERP merge - "
                   "base); 1 keeps the merge, 0 the base (default 0.5)")
    s.add_argument("--weights", type=float, nargs="+", default=None, help="relative shares of the models in the "
                   "SLERP (default equal)")
    s.add_argument("--out", required=True, help="output model directory")
    s.set_defaults(func=warp_cmd)
