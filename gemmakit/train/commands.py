"""What `gemmakit data prepare | train | teacher-cache | distill` do, behind cli.py's thin functions.

Each function takes the parsed argparse namespace; the options live in `add_*_options` so cli.py
only wires them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from gemmakit.config import CONFIGS
from gemmakit.train.data import PackedData, load_meta, prepare
from gemmakit.train.trainer import TrainConfig, check_out, check_resume, saved_settings, train
from gemmakit.weights import atomic_directory

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
    """--data/--out/--resume/--overwrite, LoRA, plus one option per TrainConfig field."""
    p.add_argument("--data", required=True, help="directory written by `gemmakit data prepare`")
    p.add_argument("--out", required=True, help="run directory: checkpoint/ (safetensors + JSON), log.jsonl, model/")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint, on any number of "
                       "ranks (settings that would change the run, e.g. --steps, are refused; --eval-every, "
                       "--ckpt-every may change, and --batch-size/--grad-accum if batch x accum x ranks stays the same)")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT (without it, an OUT "
                       "holding a checkpoint, log or model is refused)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only (default 0: full "
                   "training); merged into the weights of OUT/model at the end")
    p.add_argument("--lora-alpha", type=float, default=16.0,
                   help="LoRA scale alpha (update = B A alpha / rank; default 16.0)")
    p.add_argument("--quantize-base", choices=("int8", "int4"), default=None,
                   help="QLoRA (with --lora-rank): keep the frozen base in int8 or int4, dequantized a block at a "
                        "time in the forward and backward; the adapter is for the unquantized base, and OUT/model "
                        "is that base (bf16) with the adapter folded in (default: off, the base in fp32)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=f"{_HELP[f.name]} (default: off)")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"{_HELP[f.name]} (default {f.default})")


def add_distill_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="teacher model, run online: GGUF file, HF directory, hub id or `default` "
                     "(the embedded Gemma 3 270M)")
    src.add_argument("--teacher-cache", help="cache from `gemmakit teacher-cache`: no teacher in memory")
    p.add_argument("--objective", choices=("full", "sampled"), default=None,
                   help="with --teacher: full distribution (default) or sampled logits; a cache is always sampled")
    p.add_argument("--k", type=int, default=256,
                   help="sampled ids per token for online sampled distillation (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="full distillation temperature (default 1.0)")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="weight of the cross-entropy mixed into the loss (default 0.0: pure distillation)")
    p.add_argument("--replicate-teacher", action="store_true",
                   help="with --teacher: a full bf16 copy of the teacher on every rank (no collectives; it must fit "
                        "on one device) instead of sharding it with FSDP2 under torchrun (default: off, sharded, "
                        "in fp32); a single process casts its teacher to bf16 too")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def _spec_id(spec: str | None) -> str | None:
    """A model spec as recorded in a checkpoint: `default`, an absolute path, or as given (hub ids)."""
    from gemmakit import hub

    if hub.is_default(spec):
        return "default"
    return str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec


def load_tokenizer(spec: str | None):
    """The tokenizer of a model SPEC (see hub.resolve) without loading its weights."""
    from gemmakit import hub
    from gemmakit.tokenizer import Tokenizer

    s = hub.resolve(spec)
    if s.kind == "gguf":
        from gemmakit.gguf import read_gguf_header

        return Tokenizer.from_gguf_vocab(read_gguf_header(s.value)[1])
    if s.kind == "hf":
        return Tokenizer.from_dir(s.value)
    raise ValueError(f"{spec!r} names no tokenizer: give a GGUF file or an HF model directory")


TOKENIZER_DIR = "tokenizer"  # data prepare keeps a copy of its tokenizer here


def data_tokenizer(data_dir: str | Path):
    """The tokenizer the data was prepared with: the copy in DATA/tokenizer/, else the spec meta.json
    names if it still loads; None if unknown (data prepared by the library with another encoder)."""
    from gemmakit.tokenizer import Tokenizer

    if (Path(data_dir) / TOKENIZER_DIR).is_dir():
        return Tokenizer.from_dir(Path(data_dir) / TOKENIZER_DIR)
    spec = load_meta(data_dir).get("tokenizer")
    if not spec:
        return None
    try:
        return load_tokenizer(spec)
    except (ValueError, OSError):
        return None


def data_prepare(args: argparse.Namespace) -> None:
    if getattr(args, "chat", False):
        return data_prepare_chat(args)
    tok = load_tokenizer(args.tokenizer)
    out = Path(args.out)
    # A copy of the tokenizer, so a model trained from scratch on this data can be saved with it.
    with atomic_directory(out / TOKENIZER_DIR) as tmp:
        tok.save(tmp)
    # Documents are plain text: a literal "<bos>" or "<start_of_turn>" in them is text, not a control
    # id (only prepare() places <bos>/<eos>, one each per document).
    meta = prepare(args.inputs, lambda t: tok.encode(t, add_bos=False, parse_special=False), out, len(tok),
                   tokenizer_name=_spec_id(args.tokenizer), val_fraction=args.val_fraction,
                   bos=tok.bos_id, eos=tok.eos_id, val_files=args.val_files)
    print(json.dumps({k: v for k, v in meta.items() if k != "val_documents"}))
    if meta["invalid_utf8_replaced"]:
        print(f"note: {meta['invalid_utf8_replaced']} invalid UTF-8 sequences were replaced by U+FFFD", file=sys.stderr)


def data_prepare_chat(args: argparse.Namespace) -> None:
    """`data prepare --chat`: conversations rendered with the tokenizer's model's template (chat_data.py)."""
    from gemmakit import hub
    from gemmakit.train.chat_data import prepare_chat

    if args.seq_len is None:
        raise ValueError("--chat needs --seq-len: conversations longer than it are dropped (never split)")
    if args.val_files:
        raise ValueError("--val-files is for plain text; chat data is split by --val-fraction")
    generation = hub.load_config(args.tokenizer).generation
    tok = load_tokenizer(args.tokenizer)
    meta = prepare_chat(args.inputs, tok, generation, args.out, args.seq_len, tokenizer_name=_spec_id(args.tokenizer),
                        val_fraction=args.val_fraction, on_error=args.on_error)
    print(json.dumps({k: v for k, v in meta.items() if k != "val_documents"}))
    if meta["dropped_too_long"]:
        print(f"note: {meta['dropped_too_long']} conversations longer than --seq-len {args.seq_len} were dropped",
              file=sys.stderr)
    if meta["skipped"]:
        print(f"note: {meta['skipped']} bad lines were skipped", file=sys.stderr)


def new_model(spec: str, seed: int, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) to train, in `dtype`: a preset or .json/.toml config gets a seeded
    random init (in fp32, then cast; no tokenizer of its own: None); anything else (GGUF, HF dir, hub id,
    `default`) is loaded with its weights and tokenizer for fine-tuning."""
    from gemmakit.model import build

    if _is_config(spec):
        from gemmakit.train.distill import student_config

        model = build(student_config(spec), "cpu")
        model.init_weights(generator=torch.Generator().manual_seed(seed))
        return model.to(dtype), None
    from gemmakit import hub

    return hub.load(spec, dtype=dtype, progress=_rank0())


def _is_config(spec: str) -> bool:
    return spec in CONFIGS or spec.endswith((".json", ".toml"))


def model_config(spec: str):
    """The Config of a model SPEC (preset, config file or weights), read without loading weights."""
    from gemmakit import hub
    from gemmakit.train.distill import student_config

    return student_config(spec) if _is_config(spec) else hub.load_config(spec)


def _check_run_dir(args: argparse.Namespace, extra: dict) -> None:
    """Before any loading: refuse bad LoRA options, to overwrite an earlier run, or to resume it with
    other settings."""
    if args.quantize_base and not args.lora_rank:
        raise ValueError(f"--quantize-base {args.quantize_base} needs --lora-rank: the quantized base is frozen, "
                         f"only LoRA adapters train (QLoRA)")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group is joined later
    if world > 1 and (args.quantize_base or getattr(args, "on_policy", False)):
        raise ValueError("--quantize-base and --on-policy run in one process (not under torchrun)")
    check_out(args.out, args.resume, args.overwrite)
    if args.resume:
        saved_cfg, saved_extra = saved_settings(args.out)
        check_resume(saved_cfg, saved_extra, _train_config(args), extra, world)  # notes are printed by train()


def _rank0() -> bool:
    """Whether this process prints and writes (rank 0 under torchrun; known before the group is joined)."""
    return int(os.environ.get("RANK", "0")) == 0


def _run_extra(args: argparse.Namespace, **objective) -> dict:
    """What a checkpoint records beyond TrainConfig, compared on --resume."""
    meta = load_meta(args.data)
    return {"model": _spec_id(args.model), "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
            **({"quantize_base": args.quantize_base} if args.quantize_base else {}),
            "data": {"train_tokens": int(meta["tokens"]["train"]), "documents": int(meta["documents"]["train"])},
            **objective}


def _fit(args: argparse.Namespace, model: torch.nn.Module, tokenizer=None, loss_fn=None, extra: dict | None = None,
         max_windows: int | None = None, chat: bool = False, wrap_data=None,
         teacher: torch.nn.Module | None = None) -> None:
    """Train `model` on args.data with the TrainConfig options; save OUT/model at the end (rank 0), with
    `tokenizer` (the fine-tuned model's), or the data's tokenizer for a model trained from scratch.
    With LoRA, OUT/adapter gets the adapters in PEFT's format too (text models), OUT/model the merged
    weights; with --quantize-base (QLoRA) the base is quantized first (gemmakit.train.qlora), and
    OUT/model is the unquantized base (bf16) with the adapter folded in.
    `chat`: args.data is chat data (ChatData: whole conversations, loss on the replies).
    `wrap_data(data, model)`: the training batches' source made from the data (on-policy SFT).
    `teacher`: the online teacher `loss_fn` runs, sharded or replicated (parallel.place_teacher).
    Under torchrun (`torchrun --nproc-per-node N -m gemmakit ...`) the model is sharded with FSDP2, each
    rank reads its slice of every global batch, and only rank 0 prints and writes the log and OUT/model."""
    from gemmakit.train.distill import check_pieces
    from gemmakit.train.parallel import (apply_activation_checkpointing, full_model, init_distributed,
                                         place_teacher, shard)

    cfg = _train_config(args)
    meta = load_meta(args.data)
    max_id = int(meta.get("max_id", meta["vocab_size"] - 1))
    if max_id >= model.config.vocab_size:
        raise ValueError(f"the data's tokenizer has ids up to {max_id}, the model only {model.config.vocab_size} rows: "
                         f"prepare the data with the model's tokenizer")
    data_tok = data_tokenizer(args.data)
    check_pieces(tokenizer, data_tok, "model's", "data's")
    tokenizer = tokenizer or data_tok
    if tokenizer is None and _rank0():
        print(f"gemmakit: warning: {args.data} names no tokenizer gemmakit can load; {Path(args.out) / 'model'} will "
              f"have none (prepare the data with `gemmakit data prepare`)", file=sys.stderr)
    if args.quantize_base:
        from gemmakit.train.qlora import quantize_base

        if model.config.vision is not None:
            raise ValueError("--quantize-base is for text models: a vision model's adapter cannot be saved for "
                             "its unquantized base (PEFT's module names of the vision wrapper are not mapped)")
        quantize_base(model, args.quantize_base)
    if args.lora_rank:
        from gemmakit.train.lora import apply_lora

        apply_lora(model, args.lora_rank, args.lora_alpha, generator=torch.Generator().manual_seed(cfg.seed))
    rank, world = init_distributed()
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if world > 1:
        shard(model, bf16=cfg.bf16)
    if teacher is not None:
        place_teacher(teacher, getattr(args, "replicate_teacher", False))
    val = None
    if chat:
        from gemmakit.train.chat_data import ChatData

        data = ChatData(args.data, "train", cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
        if wrap_data is not None:
            data = wrap_data(data, model)
        if meta["documents"]["val"]:
            val = ChatData(args.data, "val", cfg.seq_len, cfg.batch_size, shuffle=False)
    else:
        data = PackedData(args.data, "train", cfg.seq_len, cfg.batch_size, cfg.mask_documents, seed=cfg.seed,
                          rank=rank, world=world, max_windows=max_windows)
        if meta["tokens"]["val"] > cfg.seq_len:
            val = PackedData(args.data, "val", cfg.seq_len, cfg.batch_size, cfg.mask_documents, shuffle=False)
    if args.overwrite and rank == 0:
        for name in ("model", "adapter"):  # the earlier run's (checkpoint: train())
            shutil.rmtree(Path(args.out) / name, ignore_errors=True)
    res = train(model, data, cfg, args.out, loss_fn=loss_fn, val=val, resume=args.resume, extra_state=extra,
                rank=rank, overwrite=args.overwrite)
    if not res["interrupted"]:  # (the ranks agree on it) the trained model, gathered to rank 0 under FSDP2
        model = full_model(model, lambda config=model.config: _plain_like(config, args))
    if rank != 0:
        return
    if res["interrupted"]:
        print(f"stopped by {res['interrupted']} at step {res['step']}; checkpoint saved in {args.out}; "
              f"continue with --resume", file=sys.stderr)
        return
    from gemmakit import weights

    if args.lora_rank:
        from gemmakit.train.lora import merge_lora, save_adapter

        adapter = Path(args.out) / "adapter"
        if model.config.vision is None:  # a vision model's HF module names differ from ours (not mapped)
            save_adapter(model, adapter, base_model_name_or_path=_spec_id(args.model))
        if args.quantize_base:
            from gemmakit.adapters import load_adapter

            # The adapter is for the unquantized base, as --adapter applies it. The quantized model's
            # memory goes first (the caller still holds the module): the base is loaded in its place.
            model.to("meta")
            model, _ = new_model(args.model, args.seed, torch.bfloat16)
            load_adapter(model, adapter)
        else:
            merge_lora(model)
    weights.save(model, Path(args.out) / "model", tokenizer=tokenizer)
    last = res["log"][-1] if res["log"] else {}
    report = {"step": res["step"], "loss": last.get("loss"), "val_loss": last.get("val_loss"),
              "model": str(Path(args.out) / "model")}
    if args.lora_rank and (Path(args.out) / "adapter").is_dir():
        report["adapter"] = str(Path(args.out) / "adapter")
    print(json.dumps(report))


def _plain_like(config, args: argparse.Namespace) -> torch.nn.Module:
    """An unsharded model of the trained one's structure (`config`, LoRA adapters) on the CPU, to load into."""
    from gemmakit.model import build

    plain = build(config, "cpu")
    if args.lora_rank:
        from gemmakit.train.lora import apply_lora

        apply_lora(plain, args.lora_rank, args.lora_alpha)
    return plain


def train_cmd(args: argparse.Namespace) -> None:
    extra = _run_extra(args, objective="cross_entropy")
    _check_run_dir(args, extra)
    model, tokenizer = new_model(args.model, args.seed, _base_dtype(args))
    _fit(args, model, tokenizer, extra=extra)


def _base_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype a model to train is loaded in: bf16 for a base that is quantized next (QLoRA; from
    bf16, the int8/int4 rounding is the same to well within its step, and loading takes half the
    memory), else fp32 (the trainer keeps fp32 weights; --bf16 is autocast)."""
    return torch.bfloat16 if args.quantize_base else torch.float32


def teacher_cache(args: argparse.Namespace) -> None:
    from gemmakit import hub
    from gemmakit.train.distill import check_pieces
    from gemmakit.train.teacher_cache import build_teacher_cache

    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise ValueError(f"--max-tokens {args.max_tokens} is less than one sequence of --seq-len {args.seq_len}")
    meta = load_meta(args.data)  # before loading the teacher: a bad --data fails fast
    tokens = int(meta["tokens"]["train"])
    if args.max_tokens is not None:
        tokens = min(tokens, args.max_tokens)
    tokens -= tokens % args.seq_len
    print(f"teacher cache: {tokens:,} tokens x k {args.k} x 6 bytes = {tokens * args.k * 6 / 2**20:,.1f} MiB in "
          f"{args.out}", file=sys.stderr)
    teacher, tok = hub.load(args.teacher)
    check_pieces(tok, data_tokenizer(args.data), "teacher's", "data's")
    meta = build_teacher_cache(teacher, args.data, args.out, k=args.k, seq_len=args.seq_len,
                               batch_size=args.batch_size, mask_documents=args.mask_documents, seed=args.seed,
                               teacher_name=_spec_id(args.teacher), bf16=args.bf16, max_tokens=args.max_tokens)
    print(json.dumps(meta))


def distill(args: argparse.Namespace) -> None:
    from gemmakit.train import distill as D
    from gemmakit.train.teacher_cache import TeacherCache

    if args.teacher_cache:
        if args.replicate_teacher:
            raise ValueError("--replicate-teacher is for an online --teacher; a teacher cache has no teacher to place")
        if args.objective == "full":
            raise ValueError("a teacher cache holds sampled logits only; full distillation needs --teacher")
        cache = TeacherCache(args.teacher_cache)
        extra = _run_extra(args, objective="sampled", teacher_cache=_spec_id(args.teacher_cache), alpha=args.alpha)
    else:
        objective = args.objective or "full"
        settings = {"k": args.k} if objective == "sampled" else {"temperature": args.temperature}
        if args.replicate_teacher:  # a bf16 teacher: other numerics, compared on --resume
            settings["replicate_teacher"] = True
        extra = _run_extra(args, objective=objective, teacher=_spec_id(args.teacher), alpha=args.alpha, **settings)
    _check_run_dir(args, extra)
    student, tokenizer = new_model(args.model, args.seed, _base_dtype(args))
    config = student.config
    if args.teacher_cache:
        cache.check(args.data, args.seq_len, args.mask_documents, config.vocab_size)
        loss_fn = D.cached_sampled_loss(cache, args.alpha, args.chunk)
        max_windows = cache.meta["windows"]  # a cache bounded by --max-tokens covers the first windows only
    else:
        from gemmakit import hub

        D.check_vocab(config, hub.load_config(args.teacher).vocab_size)
        if args.objective == "sampled" and not 0 < args.k <= config.vocab_size:
            raise ValueError(f"--k {args.k} must be in [1, {config.vocab_size}] (the student's vocabulary)")
        teacher, teacher_tok = hub.load(args.teacher, torch.bfloat16 if args.replicate_teacher else torch.float32,
                                        progress=_rank0())
        D.check_pieces(teacher_tok, tokenizer or data_tokenizer(args.data), "teacher's", "student's")
        if args.objective == "sampled":
            loss_fn = D.online_sampled_loss(teacher, args.k, args.alpha, args.chunk, args.seed)
        else:
            loss_fn = D.online_full_loss(teacher, args.temperature, args.alpha, args.chunk)
        max_windows = None
    _fit(args, student, tokenizer, loss_fn, extra, max_windows, teacher=None if args.teacher_cache else teacher)


def sft_cmd(args: argparse.Namespace) -> None:
    """`gemmakit sft`: supervised fine-tuning on chat data; the loss is on the model turns only
    (gemmakit.train.sft: with a teacher, off- or on-policy)."""
    from gemmakit.train.sft import sft

    sft(args)
