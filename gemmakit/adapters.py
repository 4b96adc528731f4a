"""LoRA adapters in PEFT's format: written by gemmakit's training, read onto any gemmakit model.

An adapter directory holds what `peft.PeftModel.save_pretrained` writes for a LoRA adapter:
  adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules (module names' last part), ...
  adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]
where <module> is the adapted Linear's name in transformers' model (gemmakit's module names are the HF
ones, e.g. model.layers.0.self_attn.q_proj). The adapted weight is W + (B @ A) * scale, with scale =
lora_alpha / r (PEFT's use_rslora: lora_alpha / sqrt(r)). So `peft.PeftModel.from_pretrained` applies a
gemmakit adapter to transformers' Gemma, and gemmakit applies a PEFT adapter (`load_adapter`).

This module sits beside the engine (it imports no training code): `--adapter DIR` on generate, chat and
perplexity folds the adapter into the loaded weights before any quantization. gemmakit ships one adapter
of its own, for the embedded model (`default_adapter`), which `chat` applies unless --no-adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the transformers model as base_model.model
# Settings of a LoRA adapter that change what it computes beyond W + B A scale; refused unless off.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False}
# gemmakit's own chat adapter for the embedded model, shipped as package data (see default_adapter).
DEFAULT_ADAPTER_DIR = Path(__file__).resolve().parent / "default_adapter"
_UNSUPPORTED_IF_SET = ("modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters",
                       "alora_invocation_tokens")


def write_adapter(path: str | os.PathLike, lora: dict[str, tuple[Tensor, Tensor]], r: int, lora_alpha: float,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write `lora` ({HF module name: (A [r, in], B [out, r])}) as a PEFT LoRA adapter directory.

    The directory is built under a temporary name and renamed into place (an existing adapter directory
    is replaced once the new one is complete). Raises ValueError for an empty `lora` or a rank that is
    not `r`, FileExistsError if `path` is a file or a non-empty directory that is not an adapter.
    """
    from gemmakit.weights import atomic_directory, check_replaceable

    if not lora:
        raise ValueError("no LoRA adapters to save")
    target = check_replaceable(Path(path).expanduser(), ADAPTER_CONFIG)
    tensors = {}
    for name, (a, b) in lora.items():
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{name}: LoRA rank {a.shape[0]}, expected r {r}")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
              "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in lora})}
    with atomic_directory(target) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return target


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends in it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[Tensor, Tensor, float]]]:
    """(adapter_config, {module name: (A [r, in], B [out, r], scale)}) of a PEFT LoRA directory.

    Module names are as saved (transformers' names without PEFT's `base_model.model.`). Raises
    FileNotFoundError for a missing file, ValueError for an adapter that is not plain LoRA (DoRA, biases,
    modules_to_save, ...: named), or tensors that do not pair up.
    """
    d = Path(path).expanduser()
    if not (d / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{d}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    if not (d / ADAPTER_WEIGHTS).is_file():
        which = " (only the pickled adapter_model.bin, which gemmakit does not load)" if (d / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS}{which}")
    try:
        config = json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{d / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{d / ADAPTER_CONFIG}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                         f"only LoRA adapters are supported")
    bad = [f"{k}={config[k]!r}" for k, ok in _UNSUPPORTED.items() if config.get(k, ok) != ok]
    bad += [f"{k}={config[k]!r}" for k in _UNSUPPORTED_IF_SET if config.get(k)]
    if bad:
        raise ValueError(f"{d}: LoRA settings gemmakit does not apply: {', '.join(bad)}")
    try:
        with safe_open(d / ADAPTER_WEIGHTS, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{d / ADAPTER_WEIGHTS}: not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{d / ADAPTER_WEIGHTS}: unexpected tensor {key} (not a LoRA A/B matrix of a Linear layer)")
        pairs.setdefault(m[1], {})[m[2]] = t
    out = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{d / ADAPTER_WEIGHTS}: {name} has {', '.join(sorted(ab))} only")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{d / ADAPTER_WEIGHTS}: {name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                             f"do not form B @ A")
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[name] = (a, b, scale)
    if not out:
        raise ValueError(f"{d / ADAPTER_WEIGHTS}: no LoRA tensors")
    return config, out


def _module_name(name: str, model: nn.Module) -> str:
    """A transformers module name as gemmakit's: wrapped (vision) models' prefixes renamed as weights.sanitize does."""
    from gemmakit.weights import _RENAMES

    if getattr(getattr(model, "config", None), "vision", None) is None:
        return name
    return next((n + name[len(o):] for o, n in _RENAMES if name.startswith(o)), name)


def default_adapter() -> Path | None:
    """The chat adapter shipped with gemmakit for the embedded Gemma 3 270M, or None if this install has none.

    A PEFT LoRA directory (gemmakit/default_adapter/: rank 8 on every attention and MLP projection) trained
    by experiments/sft_chat.py on chatterbot-corpus's English dialogs (BSD-3-Clause; docs/sft.md has the
    run and its figures). `gemmakit chat` on the embedded model folds it in unless `--no-adapter`.
    """
    d = DEFAULT_ADAPTER_DIR
    return d if (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file() else None


def check_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """What stops the adapter in `path` from applying to `model`, one line per module (empty: it fits).

    Looks only at module types and shapes, so `model` may be built on the meta device (no weights
    loaded). Raises as `read_adapter` does for a directory that is not a readable LoRA adapter.
    """
    _, lora = read_adapter(path)
    return _plan(model, lora)[0]


def _plan(model: nn.Module, lora: dict[str, tuple[Tensor, Tensor, float]]) -> tuple[list[str], list[tuple]]:
    """(problems, [(weight, A, B, scale)]) of folding `lora` into `model`."""
    modules = dict(model.named_modules())
    problems, plan = [], []
    for name, (a, b, scale) in lora.items():
        ours = _module_name(name, model)
        m = modules.get(ours)
        w = getattr(m, "weight", None)
        if not isinstance(w, Tensor) or w.ndim != 2:
            problems.append(f"{name}: no such Linear layer in {getattr(model.config, 'name', 'the model')}")
        elif not isinstance(m, nn.Linear) or not w.is_floating_point():
            problems.append(f"{name}: the layer is quantized ({type(m).__name__}); apply the adapter before quantizing")
        elif (b.shape[0], a.shape[1]) != tuple(w.shape):
            problems.append(f"{name}: adapter is for a [{b.shape[0]}, {a.shape[1]}] weight, the model's is {list(w.shape)}")
        else:
            plan.append((w, a, b, scale))
    return problems, plan


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> int:
    """Fold the PEFT LoRA adapter in `path` into `model`'s weights (W += B @ A * scale, in fp32, then
    cast to W's dtype); returns the number of adapted layers.

    Every adapter tensor is checked before any weight changes: a module the model lacks, a shape that
    does not fit, or a quantized weight is named in one ValueError (load the adapter before quantizing).
    """
    _, lora = read_adapter(path)
    problems, plan = _plan(model, lora)
    if problems:
        raise ValueError(f"adapter {path} does not fit the model ({len(problems)} problems): " + "; ".join(problems))
    for w, a, b, scale in plan:
        w.copy_((w.float() + (b.float() @ a.float()) * scale).to(w.dtype))
    return len(plan)
