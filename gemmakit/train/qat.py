"""Quantization-aware training: `gemmakit qat --model SPEC --format FORMAT --data DIR --steps N --out DIR`.

The model trains with fake-quantized weights: every forward rounds each weight matrix to FORMAT's grid
(`quant.fake_quantize`, the same rounding as `quant.quantize`) and the backward passes the gradient
straight through the rounding to the float weights (the straight-through estimator; Bengio et al., 2013,
as in the Gemma 3 report's QAT). The objective is the frozen unquantized model's next-token
distribution: forward KL(P_original || P_qat) over the whole vocabulary (`--objective full`), or over k
sampled ids (`--objective sampled`, the Gemma 3 recipe), through the distillation losses of losses.py.
The trained float weights, quantized by PTQ, ARE the trained model: OUT/model holds them (fp32), and
q4_0 / q8_0 runs also write OUT/model-FORMAT.gguf (llama.cpp's blocks of exactly that grid).

Applied from outside the model, to exactly the tensors `quant.quantize` quantizes: every Linear of the
decoder blocks and the tied embedding / LM head (a vision tower stays as it is). The wrappers are
nn.Linear / nn.Embedding subclasses with the same parameter names, so state dicts, checkpoints and
`quant.quantize` see an ordinary model.

Why not torchao's QAT: it is not installed here, and its fake quantizers do not have these grids. Its
symmetric int4 divides by 7.5 with rounding to nearest where Q4_0 divides the signed peak by -8 and
truncates x + 8.5; its asymmetric int4 rounds the zero point to an integer where ours keeps the group
minimum in float; and it fake-quantizes Linear layers, not the tied embedding. Trained on another grid,
the weights would not be what PTQ then rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.quant import MODES, fake_quantize
from gemmakit.train.trainer import LossFn, TrainConfig

# QAT rounds weights; w8a8 also rounds activations at run time, which training here does not model.
FORMATS = tuple(m for m in MODES if m != "w8a8")
GGUF_TYPES = ("q4_0", "q8_0")  # formats a GGUF stores as such (export.py's block types)
OBJECTIVES = ("full", "sampled")
# QAT starts from a trained model and only nudges weights across rounding boundaries: a fine-tuning lr,
# a short warmup, and no weight decay (decay would pull the weights, hence the grid's scales, to zero).
DEFAULTS = {"lr": 5e-5, "warmup": 10, "weight_decay": 0.0}


# -- fake quantization -----------------------------------------------------------------------------------

class _StraightThrough(torch.autograd.Function):
    """y = fake_quantize(w, mode); dL/dw = dL/dy. Every format's scale comes from its own group's
    largest weight, so no weight is ever outside the grid's range: the gradient is the identity."""

    @staticmethod
    def forward(ctx, w: Tensor, mode: str) -> Tensor:  # type: ignore[override]
        return fake_quantize(w, mode)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def fake_quantized(w: Tensor, mode: str) -> Tensor:
    """`w` [out, in] rounded to `mode`'s grid (quant.fake_quantize) with a straight-through gradient."""
    return _StraightThrough.apply(w, mode)


class _FakeQuant:
    """The fake-quantized weight of a wrapper, computed once per training step's loss (`step_cache`) or
    per evaluation (eval mode without autograd), else on every use.

    Why a cache at all: the tied embedding is used twice per forward (lookup and LM head, the head a
    chunk at a time), and rounding the 270M's 262,144 x 640 table takes seconds. Why not a cache keyed on
    the weight's version: the fused AdamW step updates parameters without bumping it.
    """

    mode: str
    weight: nn.Parameter

    def _init_fake(self, mode: str) -> None:
        self.mode = mode
        self._cache: tuple | None = None  # (weight version, grad mode, fake-quantized weight)
        self._scoped = False

    def fake_weight(self) -> Tensor:
        w = self.weight
        key = (w._version, torch.is_grad_enabled())
        reuse = self._scoped or (not self.training and not torch.is_grad_enabled())
        if reuse and self._cache is not None and self._cache[:2] == key:
            return self._cache[2]
        fq = fake_quantized(w, self.mode)
        self._cache = (*key, fq) if reuse else None
        return fq

    def train(self, mode: bool = True):
        self._cache = None  # the weights may change in the other mode
        return super().train(mode)  # type: ignore[misc]


class FakeQuantLinear(_FakeQuant, nn.Linear):
    """An nn.Linear (same weight, shared) whose forward uses the weight rounded to `mode`'s grid."""

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        nn.Linear.__init__(self, linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self._init_fake(mode)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fake_weight())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}"


class FakeQuantEmbedding(_FakeQuant, nn.Embedding):
    """The tied embedding / LM head (same table, shared) rounded to `mode`'s grid in both uses."""

    def __init__(self, emb: nn.Embedding, mode: str) -> None:
        nn.Embedding.__init__(self, emb.num_embeddings, emb.embedding_dim, device="meta")
        self.weight = emb.weight
        self._init_fake(mode)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.fake_weight())

    def attend(self, h: Tensor) -> Tensor:
        """Logits h @ E_q^T [..., vocab] (Gemma.logits calls it)."""
        return F.linear(h, self.fake_weight())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}"


def prepare_qat(model: nn.Module, mode: str) -> nn.Module:
    """Wrap, in place, every tensor `quant.quantize(model, mode)` quantizes: the decoder's Linear layers
    and the tied embedding. The parameters are shared (not copied) and keep their names.

    Raises ValueError for an unknown mode, a matrix whose width the format cannot take (e.g. not a
    multiple of 32 for q4_0), or an embedding that is not a plain nn.Embedding (already quantized).
    """
    if mode not in FORMATS:
        raise ValueError(f"unknown quantization format {mode!r}; choose one of {', '.join(FORMATS)}")
    body = model.model
    if type(body.embed_tokens) is not nn.Embedding:
        raise ValueError(f"QAT needs a float model; the embedding is a {type(body.embed_tokens).__name__} "
                         f"(already quantized or packed for decoding?)")
    targets = [(parent, name, child) for parent in list(body.layers.modules())
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for _, _, m in targets + [(body, "embed_tokens", body.embed_tokens)]:
        fake_quantize(m.weight.detach()[:1], mode)  # one row: quant's own check of the width, before training
    for parent, name, child in targets:
        setattr(parent, name, FakeQuantLinear(child, mode))
    body.embed_tokens = FakeQuantEmbedding(body.embed_tokens, mode)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _FakeQuant):
                _off_the_boundaries(m.weight, mode)
    return model


# Where the trained (latent) weights start: this fraction of the way from each weight's grid value back
# to the weight itself. Weights dequantized from a GGUF sit on a grid, and re-rounded to another that
# shares its blocks of 32, many land exactly on a rounding boundary (Q5_0 -> Q4_0: every odd level, half
# the matrix). The first update, however small, then moves all of them across together in the gradient's
# direction, a full step each: on the real 270M one step at lr 5e-6 took the KL to the original from
# 0.53 to 10.6. A quarter of the way in from the boundary they cross one at a time, as from a float
# checkpoint: the same step at lr 5e-5 took it to 0.41. PTQ rounds the moved weights exactly as before.
START = 0.75


def _off_the_boundaries(w: Tensor, mode: str) -> None:
    """Move `w` in place to fq + START (w - fq), fq its grid values, unless that changes any rounding
    (a group's scale computed a hair differently): then `w` stays as it is."""
    fq = fake_quantize(w, mode)
    moved = fq + START * (w - fq)
    if torch.equal(fake_quantize(moved, mode), fq):
        w.copy_(moved)


def remove_qat(model: nn.Module) -> nn.Module:
    """Undo `prepare_qat` in place: plain nn.Linear / nn.Embedding holding the (float) trained weights."""
    body = model.model
    for parent in list(body.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight = child.weight
                setattr(parent, name, plain)
    if isinstance(body.embed_tokens, FakeQuantEmbedding):
        emb = body.embed_tokens
        plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, device="meta")
        plain.weight = emb.weight
        body.embed_tokens = plain
    return model


@contextlib.contextmanager
def step_cache(model: nn.Module) -> Iterator[None]:
    """Within: each wrapper rounds its weight once and reuses it (one loss computation: the weights do
    not change inside it). The cached tensors carry the straight-through graph, used by every backward."""
    mods = [m for m in model.modules() if isinstance(m, _FakeQuant)]
    for m in mods:
        m._scoped = True
    try:
        yield
    finally:
        for m in mods:
            m._scoped, m._cache = False, None


# -- the objective ---------------------------------------------------------------------------------------

def _sampled_kl_loss(teacher: nn.Module, k: int, chunk: int) -> LossFn:
    """Sampled-logit KL to the teacher (losses.distill_sampled, kl=True), the sample drawn from torch's
    global generator: the trainer checkpoints its state, so a resumed run draws the same samples."""
    from gemmakit.train.losses import IGNORE, distill_sampled, sample_teacher

    def f(model: nn.Module, batch: dict) -> Tensor:
        with torch.inference_mode():  # the frozen teacher's output is only read
            th = teacher.hidden(batch["tokens"], batch.get("positions"), segment_ids=batch.get("segment_ids"))
        targets = batch["targets"].reshape(-1)
        ids = torch.zeros(targets.shape[0], k, dtype=torch.long)
        probs = torch.zeros(targets.shape[0], k)
        with torch.no_grad():
            keep = (targets != IGNORE).nonzero()[:, 0]  # only counted positions are sampled
            flat = th.reshape(-1, th.shape[-1])[keep].float()
            for s in range(0, flat.shape[0], chunk):
                ids[keep[s:s + chunk]], probs[keep[s:s + chunk]] = sample_teacher(teacher.logits(flat[s:s + chunk]), k)
        h = model.hidden(batch["tokens"], batch.get("positions"), segment_ids=batch.get("segment_ids"))
        return distill_sampled(model, h, ids, probs, targets, chunk=chunk, kl=True)
    return f


def qat_loss(teacher: nn.Module, objective: str = "full", k: int = 256, chunk: int = 1024) -> LossFn:
    """The trainer's loss for QAT: KL(teacher || fake-quantized model) per token, averaged.

    objective "full": over the whole vocabulary (losses.distill_jsd at beta 0, forward KL: the gradient
    of Gemma 2's distillation, and exactly 0 when the distributions agree); "sampled": over k ids
    sampled from the teacher per token (Gemma 3's sampled distillation). The teacher is frozen here.
    """
    from gemmakit.train.distill import online_jsd_loss

    teacher.eval().requires_grad_(False)
    inner = online_jsd_loss(teacher, beta=0.0, chunk=chunk) if objective == "full" else _sampled_kl_loss(teacher, k, chunk)

    def f(model: nn.Module, batch: dict) -> Tensor:
        with step_cache(model):
            return inner(model, batch)
    return f


# -- `gemmakit qat` ----------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    """Register `gemmakit qat` on cli.py's subcommands."""
    from gemmakit.train.commands import _HELP

    s = sub.add_parser(
        "qat", help="quantization-aware training toward the unquantized model",
        description="Quantization-aware training: the model trains with its weights rounded to FORMAT's grid in "
                    "every forward (straight-through gradient), toward the next-token distribution of the frozen "
                    "original (KL). Writes OUT/model, the trained float weights (fp32), which `--quantize FORMAT` "
                    "turns into the trained quantized model; q4_0 and q8_0 also write OUT/model-FORMAT.gguf for "
                    "llama.cpp. Resumable like `train` (--resume), and sharded like it under torchrun.")
    s.add_argument("--model", required=True, help="model to quantize: GGUF file, HF directory, hub id or `default` "
                   "(the embedded Gemma 3 270M)")
    s.add_argument("--format", required=True, help=f"target quantization, one of {', '.join(FORMATS)} (the Gemma 3 "
                   f"report's formats: q4_0, int4-channel, fp8)")
    s.add_argument("--data", required=True, help="directory written by `gemmakit data prepare`")
    s.add_argument("--out", required=True, help="run directory: checkpoint/, log.jsonl, model/, model-FORMAT.gguf")
    again = s.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue exactly from OUT's checkpoint (settings "
                       "that would change the run are refused)")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")
    s.add_argument("--objective", default="full", help="KL over the full vocabulary (full, default) or over --k "
                   "ids sampled from the original per token (sampled)")
    s.add_argument("--k", type=int, default=256, help="sampled ids per token with --objective sampled (default 256)")
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), DEFAULTS.get(f.name, f.default)
        if isinstance(f.default, bool):
            s.add_argument(flag, action="store_true", help=f"{_HELP[f.name]} (default: off)")
        else:
            s.add_argument(flag, type=type(f.default), default=default, help=f"{_HELP[f.name]} (default {default})")
    s.set_defaults(func=qat_cmd)


def _check_args(args: argparse.Namespace) -> None:
    if args.format == "w8a8":  # its activations are rounded at run time, which training does not model
        raise ValueError(f"--format w8a8 cannot be trained (its activations are rounded at run time); train "
                         f"int8, whose weights w8a8 uses: one of {', '.join(FORMATS)}")
    if args.format not in FORMATS:
        raise ValueError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.objective not in OBJECTIVES:
        raise ValueError(f"unknown --objective {args.objective!r}; choose full or sampled")


def qat_cmd(args: argparse.Namespace) -> None:
    """`gemmakit qat`: see the module docstring. Everything the user can get wrong is checked before training."""
    from gemmakit import hub, weights
    from gemmakit.model import build
    from gemmakit.train.commands import _rank0, _spec_id, data_tokenizer
    from gemmakit.train.parallel import (apply_activation_checkpointing, full_model, init_distributed,
                                         place_teacher, shard)
    from gemmakit.train.data import PackedData, load_meta
    from gemmakit.train.distill import check_pieces
    from gemmakit.train.trainer import check_out, train

    _check_args(args)
    meta = load_meta(args.data)  # a missing or unprepared --data fails before anything loads
    check_out(args.out, args.resume, args.overwrite)
    out = Path(args.out)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    vocab = hub.load_config(args.model).vocab_size  # read without the weights: fail fast
    if args.objective == "sampled" and not 0 < args.k <= vocab:
        raise ValueError(f"--k {args.k} must be in [1, {vocab}] (the model's vocabulary)")
    if int(meta.get("max_id", meta["vocab_size"] - 1)) >= vocab:
        raise ValueError(f"the data's tokenizer has more ids than the model's {vocab} rows: prepare the data with "
                         f"the model's tokenizer")
    model, tokenizer = hub.load(args.model, dtype=torch.float32, native=False, progress=_rank0())  # floats to train
    check_pieces(tokenizer, data_tokenizer(args.data), "model's", "data's")
    gguf = out / f"model-{args.format}.gguf" if args.format in GGUF_TYPES else None
    if gguf is not None and (model.config.vision is not None or getattr(tokenizer, "proto", None) is None):
        why = "a vision model" if model.config.vision is not None else "no SentencePiece tokenizer"
        gguf = None
        _rank0() and print(f"note: no GGUF will be written ({why}); OUT/model with --quantize {args.format} is the trained "
              f"model", file=sys.stderr)
    teacher = copy.deepcopy(model)
    prepare_qat(model, args.format)
    rank, world = init_distributed()
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)  # the recomputed blocks round their weights again (same grid)
    if world > 1:
        # FSDP2 gathers a block's float weights before its forward, so each wrapper rounds a whole matrix
        # (Q4_0's blocks of 32 are never split across ranks); the teacher is sharded the same way.
        shard(model, bf16=cfg.bf16)
    place_teacher(teacher, replicate=False)

    data = PackedData(args.data, "train", cfg.seq_len, cfg.batch_size, cfg.mask_documents, seed=cfg.seed,
                      rank=rank, world=world)
    val = None
    if meta["tokens"]["val"] > cfg.seq_len:
        val = PackedData(args.data, "val", cfg.seq_len, cfg.batch_size, cfg.mask_documents, shuffle=False)
    extra = {"model": _spec_id(args.model), "format": args.format, "objective": args.objective,
             **({"k": args.k} if args.objective == "sampled" else {}),
             "data": {"train_tokens": int(meta["tokens"]["train"]), "documents": int(meta["documents"]["train"])}}
    if args.overwrite and rank == 0:
        import shutil

        shutil.rmtree(out / "model", ignore_errors=True)  # the earlier run's results (its checkpoint: train())
        for old in out.glob("model-*.gguf"):
            old.unlink()
    res = train(model, data, cfg, out, loss_fn=qat_loss(teacher, args.objective, args.k, cfg.chunk), val=val,
                resume=args.resume, extra_state=extra, rank=rank, overwrite=args.overwrite)
    if not res["interrupted"]:  # (the ranks agree on it) gathered to rank 0 under FSDP2, into a plain model:
        model = full_model(model, lambda config=model.config: build(config, "cpu"))  # the wrappers' names are its
    if rank != 0:
        return
    if res["interrupted"]:
        print(f"stopped by {res['interrupted']} at step {res['step']}; checkpoint saved in {out}; "
              f"continue with --resume", file=sys.stderr)
        return
    del teacher
    remove_qat(model)
    report = {"step": res["step"], "kl": res["log"][-1]["loss"] if res["log"] else None,
              "val_loss": res["log"][-1].get("val_loss") if res["log"] else None,
              "format": args.format, "model": str(weights.save(model, out / "model", tokenizer=tokenizer))}
    if gguf is not None:
        from gemmakit.export import write_gguf

        report["gguf"] = str(write_gguf(model, tokenizer, gguf, args.format, progress=False))
    report["run"] = f"gemmakit generate --model {out / 'model'} --quantize {args.format} --dtype float32"
    print(json.dumps(report))
