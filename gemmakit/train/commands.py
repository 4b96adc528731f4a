"""What `gemmakit data prepare | train | teacher-cache | distill` do, behind cli.py's thin functions.

Each function takes the parsed argparse namespace; the options live in `add_*_options` so cli.py
only wires them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from gemmakit.config import CONFIGS, Config
from gemmakit.train.data import PackedData, load_meta, prepare
from gemmakit.train.trainer import TrainConfig, train

_HELP = {
    "steps": "optimizer steps", "batch_size": "sequences per micro-batch (per device)", "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per step", "lr": "peak learning rate", "min_lr_ratio": "final lr / peak lr",
    "warmup": "linear warmup steps", "weight_decay": "AdamW weight decay", "clip": "gradient norm clip (0: off)",
    "bf16": "bf16 autocast", "activation_checkpointing": "recompute blocks in the backward",
    "mask_documents": "packed documents do not attend to each other", "chunk": "tokens per LM-head chunk in the loss",
    "ckpt_every": "checkpoint every N steps", "eval_every": "validation every N steps (0: at the end)",
    "eval_batches": "validation batches (0: all)", "seed": "seed of the init, data order and sampling",
}


def add_train_options(p: argparse.ArgumentParser) -> None:
    """--data/--out/--resume plus one option per TrainConfig field."""
    p.add_argument("--data", required=True, help="directory written by `gemmakit data prepare`")
    p.add_argument("--out", required=True, help="run directory: checkpoint.pt, log.jsonl, model/")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only (0: full training); "
                   "merged into the weights of OUT/model at the end")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (update = B A alpha / rank)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"{_HELP[f.name]} (default {f.default})")


def add_distill_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="teacher model (GGUF, HF dir, hub id), run online")
    src.add_argument("--teacher-cache", help="cache from `gemmakit teacher-cache`: no teacher in memory")
    p.add_argument("--objective", choices=("full", "sampled"), default=None,
                   help="with --teacher: full distribution (default) or sampled logits; a cache is always sampled")
    p.add_argument("--k", type=int, default=256, help="sampled ids per token for online sampled distillation")
    p.add_argument("--temperature", type=float, default=1.0, help="full distillation temperature")
    p.add_argument("--alpha", type=float, default=0.0, help="weight of the cross-entropy mixed into the loss")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def model_spec(spec: str | None) -> str | None:
    """'default' (or nothing) is the embedded Gemma 3 270M."""
    return None if spec in (None, "default") else spec


def load_tokenizer(spec: str | None):
    """The tokenizer of a model SPEC (see hub.resolve) without loading its weights."""
    from gemmakit import hub
    from gemmakit.tokenizer import Tokenizer

    s = hub.resolve(model_spec(spec))
    if s.kind == "gguf":
        from gemmakit.gguf import read_gguf_header

        return Tokenizer.from_gguf_vocab(read_gguf_header(s.value)[1])
    if s.kind == "hf":
        return Tokenizer.from_dir(s.value)
    raise ValueError(f"{spec!r} names no tokenizer: give a GGUF file or an HF model directory")


def data_prepare(args: argparse.Namespace) -> None:
    tok = load_tokenizer(args.tokenizer)
    meta = prepare(args.inputs, lambda t: tok.encode(t, add_bos=False), args.out, len(tok),
                   tokenizer_name=args.tokenizer or "default", val_fraction=args.val_fraction,
                   bos=tok.bos_id, eos=tok.eos_id, val_files=args.val_files)
    print(json.dumps({k: v for k, v in meta.items() if k != "val_documents"}))
    if meta["invalid_utf8_replaced"]:
        print(f"note: {meta['invalid_utf8_replaced']} invalid UTF-8 sequences were replaced by U+FFFD", file=sys.stderr)


def new_model(spec: str, seed: int) -> tuple[torch.nn.Module, Config]:
    """A model to train: a preset or .json/.toml config gets a seeded random init; anything else
    (GGUF, HF dir, hub id) is loaded with its weights for fine-tuning."""
    from gemmakit.model import build
    from gemmakit.train.distill import student_config

    if spec in CONFIGS or spec.endswith((".json", ".toml")):
        config = student_config(spec)
        model = build(config, "cpu")
        model.init_weights(generator=torch.Generator().manual_seed(seed))
        return model, config
    from gemmakit import hub

    model, _ = hub.load(model_spec(spec))
    return model, model.config


def _fit(args: argparse.Namespace, model: torch.nn.Module, loss_fn=None, extra: dict | None = None) -> None:
    """Train `model` on args.data with the TrainConfig options; save OUT/model at the end (rank 0)."""
    from gemmakit.train.distill import check_vocab
    from gemmakit.train.parallel import apply_activation_checkpointing, init_distributed, shard

    cfg = _train_config(args)
    meta = load_meta(args.data)
    check_vocab(model.config, meta["vocab_size"], what="data's tokenizer")
    if args.lora_rank:
        from gemmakit.train.lora import apply_lora

        apply_lora(model, args.lora_rank, args.lora_alpha, generator=torch.Generator().manual_seed(cfg.seed))
    rank, world = init_distributed()
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if world > 1:
        shard(model)
    data = PackedData(args.data, "train", cfg.seq_len, cfg.batch_size, cfg.mask_documents, seed=cfg.seed,
                      rank=rank, world=world)
    val = None
    if meta["tokens"]["val"] > cfg.seq_len:
        val = PackedData(args.data, "val", cfg.seq_len, cfg.batch_size, cfg.mask_documents, shuffle=False)
    res = train(model, data, cfg, args.out, loss_fn=loss_fn, val=val, resume=args.resume, extra_state=extra,
                rank=rank)
    if rank != 0:
        return
    if res["interrupted"]:
        print(f"stopped by {res['interrupted']} at step {res['step']}; checkpoint saved in {args.out}; "
              f"continue with --resume", file=sys.stderr)
        return
    from gemmakit import weights

    if args.lora_rank:
        from gemmakit.train.lora import merge_lora

        merge_lora(model)
    weights.save(model, Path(args.out) / "model")
    last = res["log"][-1] if res["log"] else {}
    print(json.dumps({"step": res["step"], "loss": last.get("loss"), "val_loss": last.get("val_loss"),
                      "model": str(Path(args.out) / "model")}))


def train_cmd(args: argparse.Namespace) -> None:
    model, _ = new_model(args.model, args.seed)
    _fit(args, model)


def teacher_cache(args: argparse.Namespace) -> None:
    from gemmakit import hub
    from gemmakit.train.teacher_cache import build_teacher_cache

    teacher, _ = hub.load(model_spec(args.teacher))
    meta = build_teacher_cache(teacher, args.data, args.out, k=args.k, seq_len=args.seq_len,
                               batch_size=args.batch_size, mask_documents=args.mask_documents, seed=args.seed,
                               teacher_name=args.teacher or "default", bf16=args.bf16)
    print(json.dumps(meta))


def distill(args: argparse.Namespace) -> None:
    from gemmakit.train import distill as D
    from gemmakit.train.teacher_cache import TeacherCache

    student, config = new_model(args.model, args.seed)
    if args.teacher_cache:
        if args.objective == "full":
            raise ValueError("a teacher cache holds sampled logits only; full distillation needs --teacher")
        cache = TeacherCache(args.teacher_cache)
        cache.check(args.data, args.seq_len, args.mask_documents, config.vocab_size)
        loss_fn = D.cached_sampled_loss(cache, args.alpha, args.chunk)
        extra = {"objective": "sampled", "teacher_cache": args.teacher_cache}
    else:
        from gemmakit import hub

        D.check_vocab(config, hub.load_config(model_spec(args.teacher)).vocab_size)
        teacher, _ = hub.load(model_spec(args.teacher))
        if args.objective == "sampled":
            loss_fn = D.online_sampled_loss(teacher, args.k, args.alpha, args.chunk, args.seed)
        else:
            loss_fn = D.online_full_loss(teacher, args.temperature, args.alpha, args.chunk)
        extra = {"objective": args.objective or "full", "teacher": args.teacher}
    _fit(args, student, loss_fn, extra)
