"""LoRA adapters applied from outside the model, and merging them back.

`apply_lora` registers a parametrization on the chosen Linear layers: their weight becomes
W + (B @ A) * alpha / rank, with W frozen and only A [rank, in] and B [out, rank] trained. B starts at
zero, so the adapted model starts exactly equal to the base model. `merge_lora` folds B @ A into W
and removes the parametrization, which leaves a plain model with the original parameter names (a
checkpoint saved after merging loads like any other). `save_adapter` writes the adapters alone in
PEFT's format (gemmakit.adapters), which `peft.PeftModel.from_pretrained` and `--adapter` load.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

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

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.B @ self.A).to(weight.dtype) * self.scale


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = TARGETS,
               generator: torch.Generator | None = None) -> int:
    """Freeze `model` and add LoRA adapters to the Linear layers named in `targets`; returns how many."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    model.requires_grad_(False)
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            w = module.weight
            lora = LoRA(w.shape[0], w.shape[1], rank, alpha, generator).to(device=w.device, dtype=torch.float32)
            parametrize.register_parametrization(module, "weight", lora)
            n += 1
    if n == 0:
        raise ValueError(f"no Linear layer named one of {targets} to adapt")
    return n


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight and return to plain, trainable parameters."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    model.requires_grad_(True)


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    """{module name: its LoRA} of every adapted Linear layer (names are the HF ones)."""
    return {name: m.parametrizations.weight[0] for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], LoRA)}


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
