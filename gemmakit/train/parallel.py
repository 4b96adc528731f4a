"""Applied from outside the model: activation checkpointing, and FSDP2 sharding under torchrun.

The model code does not change for either: checkpointing swaps each block's `forward` for a
checkpointed call, and FSDP2's `fully_shard` is applied to each block and then to the root (the root
group holds the tied embedding / LM head and the final norm).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args):
    # Non-reentrant checkpointing: works with inputs that do not require grad and with FSDP2.
    return checkpoint(forward, *args, use_reentrant=False)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every block in the backward instead of storing its activations."""
    for layer in model.model.layers:
        if not isinstance(layer.forward, functools.partial):
            layer.forward = functools.partial(_checkpointed, layer.forward)


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (RANK/WORLD_SIZE set) this joins the process group:
    gloo on CPU, nccl on CUDA. Without torchrun: (0, 1) and nothing is initialized."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: fully_shard each block, then the root. `hidden` and `logits` are registered as forward
    methods so the root's parameters (embedding, final norm) are gathered when the losses call them."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "hidden")
    register_fsdp_forward_method(model, "logits")
    return model


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def sum_across_ranks(x: float) -> float:
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def full_state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (collective under FSDP: every rank must call it)."""
    if not is_distributed():
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict) -> None:
    if not is_distributed():
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd,
                   options=StateDictOptions(full_state_dict=True))
