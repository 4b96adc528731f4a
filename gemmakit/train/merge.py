"""Model merging: weighted averaging, task arithmetic, SLERP of task vectors, interpolation toward the init.

Methods (each tensor merged on its own, in fp32, written in the first input's dtype):
  average          sum_i w_i theta_i / sum_i w_i (uniform by default). Gemma 2 (arXiv 2408.00118, sec. 4)
                   averages models fine-tuned with different hyperparameters; model soups (Wortsman et al.,
                   2022) is the same operation.
  task-arithmetic  base + sum_i w_i (theta_i - base) (w_i = 1 by default): task vectors added to a base,
                   Ilharco et al., "Editing models with task arithmetic" (arXiv 2212.04089).
  slerp            spherical linear interpolation (Shoemake, 1985) of the task vectors delta_i = theta_i -
                   base, per tensor, as WARP's second stage merges M RL runs (Rame et al., arXiv 2406.16768):
                   base + sin((1-t) W)/sin W delta_1 + sin(t W)/sin W delta_2, W the angle between delta_1
                   and delta_2, t = w_2 / (w_1 + w_2). For M > 2 the vectors are folded in one at a time,
                   the i-th with t = w_i / (w_1 + ... + w_i) (the running-mean rule; on the sphere the
                   result depends on the order of the inputs, unlike a mean: our choice, stated here, as
                   the paper's M > 2 rule is not restated). Without --base, the weights themselves are
                   interpolated (as mergekit's slerp does).
  interpolate      base + eta (theta - base) = (1 - eta) base + eta theta: WARP's last stage, "linear
                   interpolation towards initialization" (LITI), which the Gemma 3 report's post-training
                   (arXiv 2503.19786) builds on; eta trades the fine-tuned skill against the base's knowledge.

The inputs are HF directories (config.json + safetensors). All must have the same architecture (config)
and the same tensor names and shapes; every mismatch is named. Tensors are read one at a time through
safetensors' memory-mapped safe_open, so memory is about one model (the output) whatever the number of
inputs; the output directory is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

METHODS = ("average", "task-arithmetic", "slerp", "interpolate")
# Files of the first input copied next to the merged weights (the tokenizer and generation settings).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation between `a` and `b` (any equal shapes, taken as flat vectors, fp32):
    sin((1-t) W)/sin W a + sin(t W)/sin W b with W the angle between them. t=0 gives a, t=1 gives b
    exactly. Nearly parallel or zero vectors (sin W < 1e-6 or a norm < eps) fall back to linear interpolation."""
    na, nb = a.norm(), b.norm()
    if float(na) < eps or float(nb) < eps:
        return (1 - t) * a + t * b
    cos = torch.clamp((a.flatten() @ b.flatten()) / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    s = torch.sin(omega)
    if float(s) < 1e-6:
        return (1 - t) * a + t * b
    return torch.sin((1 - t) * omega) / s * a + torch.sin(t * omega) / s * b


def merge_tensors(method: str, tensors: list[Tensor], weights: list[float], base: Tensor | None,
                  eta: float = 1.0) -> Tensor:
    """One merged tensor (fp32) from the inputs' tensors; see the module docstring for each method.
    eta (slerp with a base only): base + eta * slerp(task vectors), WARP's two last stages in one."""
    if method == "average":
        return sum(w * x for w, x in zip(weights, tensors)) / sum(weights)
    if method == "task-arithmetic":
        return base + sum(w * (x - base) for w, x in zip(weights, tensors))
    if method == "interpolate":
        return base + weights[0] * (tensors[0] - base)
    deltas = [x - base for x in tensors] if base is not None else tensors
    acc, total = deltas[0], weights[0]
    for w, d in zip(weights[1:], deltas[1:]):
        total += w
        acc = slerp(acc, d, w / total if total else 0.0)
    return acc if base is None else base + eta * acc


def _check_method(method: str, n: int, weights: list[float] | None, has_base: bool) -> list[float]:
    """The per-input weights to use; ValueError for a combination the method does not take."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if method in ("task-arithmetic", "interpolate") and not has_base:
        raise ValueError(f"--method {method} needs --base (the model the task vectors start from)")
    if method == "interpolate":
        if n != 1:
            raise ValueError(f"--method interpolate takes one model (moved toward --base), not {n}")
        if weights is None or len(weights) != 1:
            raise ValueError("--method interpolate needs --weights ETA (one value: 0 gives the base, 1 the model)")
        return list(weights)
    if method in ("average", "slerp") and n < 2:
        raise ValueError(f"--method {method} needs at least two models, got {n}")
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} values for {n} models")
    if method in ("average", "slerp"):
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--weights for {method} must be non-negative with a positive sum, got {weights}")
    return list(weights)


class _Reader:
    """An HF checkpoint directory's tensors by name, through memory-mapped safe_open handles."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        from safetensors import SafetensorError, safe_open

        from gemmakit import weights

        self.path = path
        self.config = weights.load_config(path)
        if (path / weights.SINGLE).is_file():
            files = [path / weights.SINGLE]
        elif (path / weights.INDEX).is_file():
            index = json.loads((path / weights.INDEX).read_text()).get("weight_map") or {}
            files = [path / f for f in sorted(set(index.values()))]
        else:
            raise FileNotFoundError(f"{path}: neither {weights.SINGLE} nor {weights.INDEX} found")
        self.handles = {}
        for file in files:
            try:
                f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
            for key in f.keys():
                self.handles[key] = f
        self.shapes = {k: list(f.get_slice(k).get_shape()) for k, f in self.handles.items()}

    def get(self, key: str) -> Tensor:
        return self.handles[key].get_tensor(key)


def _mismatches(first: _Reader, other: _Reader) -> list[str]:
    """Every difference of architecture (config fields) and tensors (names, shapes) of `other` from `first`."""
    a, b = dataclasses.asdict(first.config), dataclasses.asdict(other.config)
    out = [f"config {k}: {b[k]} in {other.path}, {a[k]} in {first.path}" for k in a if k != "name" and a[k] != b.get(k)]
    for key in sorted(first.shapes.keys() | other.shapes.keys()):
        sa, sb = first.shapes.get(key), other.shapes.get(key)
        if sb is None:
            out.append(f"tensor {key}: missing in {other.path}")
        elif sa is None:
            out.append(f"tensor {key}: in {other.path} only")
        elif sa != sb:
            out.append(f"tensor {key}: shape {sb} in {other.path}, {sa} in {first.path}")
    return out


def merge(inputs: list[str | os.PathLike], out: str | os.PathLike, method: str = "average",
          weights: list[float] | None = None, base: str | os.PathLike | None = None, eta: float = 1.0) -> Path:
    """Merge the HF checkpoints `inputs` (with `base` where the method uses one) into the directory `out`.

    Returns `out`. Raises ValueError naming every architecture or tensor mismatch between the inputs
    (and base), a bad method/weights combination, or a non-float tensor; FileExistsError if `out` is an
    input or a non-empty directory that is not a checkpoint. The output carries the first input's
    config.json and tokenizer files. `eta` != 1 (slerp with a base only) scales the merged task vector:
    base + eta * slerp(...), WARP's interpolation toward the init (see `warp`).
    """
    from gemmakit.weights import CONFIG, atomic_directory, check_replaceable, write_state

    paths = [Path(p).expanduser() for p in inputs]
    base_path = Path(base).expanduser() if base is not None else None
    weights = _check_method(method, len(paths), weights, base_path is not None)
    if eta != 1.0 and (method != "slerp" or base_path is None):
        raise ValueError("eta (interpolation toward the base) applies to slerp with a base only")
    target = Path(out).expanduser()
    if any(target.resolve() == p.resolve() for p in [*paths, *([base_path] if base_path else [])]):
        raise FileExistsError(f"--out {target} is one of the models being merged; write the merge elsewhere")
    check_replaceable(target, CONFIG)
    with ExitStack() as stack:
        readers = [_Reader(p, stack) for p in paths]
        base_reader = _Reader(base_path, stack) if base_path is not None else None
        problems = [m for r in readers[1:] + ([base_reader] if base_reader else []) for m in _mismatches(readers[0], r)]
        if problems:
            raise ValueError(f"the models do not share one architecture ({len(problems)} mismatches): " + "; ".join(problems))
        state: dict[str, Tensor] = {}
        for key in sorted(readers[0].shapes):
            first = readers[0].get(key)
            if not first.is_floating_point():
                raise ValueError(f"tensor {key} of {paths[0]} is {first.dtype}: only float checkpoints merge")
            ts = [first.float()] + [r.get(key).float() for r in readers[1:]]
            b = base_reader.get(key).float() if base_reader is not None else None
            state[key] = merge_tensors(method, ts, weights, b, eta).to(first.dtype).contiguous()
            del ts, b
    with atomic_directory(target) as tmp:
        shutil.copyfile(paths[0] / CONFIG, tmp / CONFIG)
        write_state(state, tmp)
        for name in TOKENIZER_FILES:
            if (paths[0] / name).is_file():
                shutil.copyfile(paths[0] / name, tmp / name)
        record = {"method": method, "weights": weights, "models": [str(p) for p in paths],
                  "base": str(base_path) if base_path else None, **({"eta": eta} if eta != 1.0 else {})}
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return target


def warp(models: list[str | os.PathLike], base: str | os.PathLike, out: str | os.PathLike, eta: float = 0.5,
         weights: list[float] | None = None) -> Path:
    """WARP's merge (Rame et al. 2024, arXiv 2406.16768) of M >= 2 policies RL-tuned from `base`: the
    task vectors (model - base) merged by SLERP (folded in one at a time, shares `weights`), then
    linear interpolation toward the init, base + eta * merged (LITI; eta in [0, 1]: 1 keeps the SLERP
    merge, 0 returns the base). Same checks and atomic write as `merge`."""
    if not 0 <= eta <= 1:
        raise ValueError(f"--eta must be in [0, 1] (0: the base, 1: the SLERP merge), got {eta}")
    return merge(models, out, "slerp", weights, base, eta=eta)


# -- commands ----------------------------------------------------------------------------------------

def add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="HF model directories to merge (same architecture and shapes)")
    p.add_argument("--method", choices=METHODS, default="average",
                   help="average (weighted mean; default), task-arithmetic (base + sum w_i (model_i - base)), "
                        "slerp (spherical interpolation of the task vectors, WARP), interpolate (base + "
                        "ETA (model - base), WARP's LITI)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per model (average, slerp: relative shares, default equal; task-arithmetic: "
                        "scale of each task vector, default 1), or interpolate's ETA")
    p.add_argument("--base", default=None, help="the initialization the task vectors start from (needed by "
                   "task-arithmetic and interpolate; slerp interpolates task vectors with it, weights without)")
    p.add_argument("--out", required=True, help="output HF directory (replaced only once complete)")


def merge_cmd(args: argparse.Namespace) -> None:
    out = merge(args.models, args.out, args.method, args.weights, args.base)
    print(json.dumps({"method": args.method, "out": str(out)}))


def add_merge_adapter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the base model: HF directory, GGUF file, hub id or `default`")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory (adapter_config.json + "
                   "adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output HF directory with the adapter folded in, and the tokenizer")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights (default fp32)")


def merge_adapter_cmd(args: argparse.Namespace) -> None:
    from gemmakit import hub, weights
    from gemmakit.adapters import load_adapter, read_adapter

    read_adapter(args.adapter)  # a bad adapter fails before the model is loaded
    model, tokenizer = hub.load(args.model, dtype=torch.float32)
    n = load_adapter(model, args.adapter)
    out = weights.save(model, args.out, dtype=torch.bfloat16 if args.dtype == "bf16" else None, tokenizer=tokenizer)
    print(json.dumps({"adapted_layers": n, "out": str(out)}))
