"""LoRA adapters applied from outside the model, and merging them back.

`apply_lora` wraps the chosen Linear layers in `LoRALinear`: y = base(x) + (x A^T) B^T * alpha / rank,
with the base frozen and only A [rank, in] and B [out, rank] trained. B starts at zero, so the adapted
model starts exactly equal to the base model. The update is added to the layer's OUTPUT rather than to
its weight (W + B A): the backward then never forms a full [out, in] weight gradient, only x's and the
two thin matrices', which saves a third of the blocks' matrix products in a step (a weight gradient per
layer is as costly as the layer's forward), and the base may be a quantized layer that is never
materialized whole (QLoRA, gemmakit.train.qlora).

`merge_lora` folds B @ A into W and puts the plain Linear back, which leaves the original parameter
names (a checkpoint saved after merging loads like any other). `save_adapter` writes the adapters alone
in PEFT's format (gemmakit.adapters), which `peft.PeftModel.from_pretrained` and `--adapter` load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.train.qlora import QuantLinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRA(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank  # PEFT's lora_alpha / r
        # A as nn.Linear's default init (Kaiming uniform, a = sqrt(5)); B zero: no change at step 0.
        bound = 1.0 / math.sqrt(in_features)
        self.A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: Tensor) -> Tensor:
        """The update (x A^T) B^T * scale [..., out] in x's dtype (under autocast, autocast's)."""
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale

    def delta(self) -> Tensor:
        """B @ A * scale [out, in] fp32: what merging adds to the weight."""
        return (self.B.float() @ self.A.float()) * self.scale


class LoRALinear(nn.Module):
    """A frozen layer (nn.Linear, or a QuantLinear for QLoRA) plus a LoRA update of its output."""

    def __init__(self, base: nn.Linear | QuantLinear, lora: LoRA) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base, self.lora = base, lora

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora(x)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = TARGETS,
               generator: torch.Generator | None = None) -> int:
    """Freeze `model` and add LoRA adapters to the Linear (or QuantLinear) layers named in `targets`;
    returns how many. Raises ValueError for a rank below 1 or no layer to adapt."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    model.requires_grad_(False)
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, QuantLinear)) and name in targets:
                w = child.weight if isinstance(child, nn.Linear) else None
                lora = LoRA(child.out_features, child.in_features, rank, alpha, generator).to(
                    device=w.device if w is not None else child.device, dtype=torch.float32)
                setattr(parent, name, LoRALinear(child, lora))
                n += 1
    if n == 0:
        raise ValueError(f"no Linear layer named one of {targets} to adapt")
    return n


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (W += B A scale, in fp32) and return to plain, trainable
    Linear layers. Raises ValueError for adapters on a quantized base: those are applied to the
    unquantized base instead (save_adapter, then gemmakit.adapters.load_adapter)."""
    if any(isinstance(m, LoRALinear) and not isinstance(m.base, nn.Linear) for m in model.modules()):
        raise ValueError("the adapters sit on a quantized base (QLoRA): save them with save_adapter and apply "
                         "them to the unquantized base (gemmakit.adapters.load_adapter, --adapter)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base.weight
                w.copy_((w.float() + child.lora.delta()).to(w.dtype))
                setattr(parent, name, child.base)
    model.requires_grad_(True)


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    """{layer name: its LoRA} of every adapted layer (names are the HF ones, e.g.
    model.layers.0.self_attn.q_proj)."""
    return {name: m.lora for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model: nn.Module, path, base_model_name_or_path: str | None = None):
    """Write the model's LoRA adapters (before `merge_lora`) as a PEFT adapter directory; returns its path.
    Raises ValueError if the model has none, or if they differ in rank or alpha (one adapter_config)."""
    from gemmakit.adapters import write_adapter

    loras = lora_modules(model)
    if not loras:
        raise ValueError("the model has no LoRA adapters to save")
    if len({(m.rank, m.alpha) for m in loras.values()}) > 1:
        raise ValueError("the LoRA adapters differ in rank or alpha; PEFT's config names one of each")
    first = next(iter(loras.values()))
    return write_adapter(path, {n: (m.A, m.B) for n, m in loras.items()}, first.rank, first.alpha,
                         base_model_name_or_path)
