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


def shard(model: torch.nn.Module, bf16: bool = False) -> torch.nn.Module:
    """FSDP2: fully_shard each block, then the root (embedding / tied LM head, final norm). `bf16`: the
    mixed precision policy of bf16 parameters for compute (gathered in bf16: half the traffic), with
    gradients reduced and master weights (and the optimizer) kept in fp32.

    `hidden` is registered as a forward method, so the root's parameters are gathered when it runs; the
    root keeps them gathered after the forward (reshard_after_forward=False) and `logits` is not a
    forward method: the losses call `logits` once per chunk of kept targets, a number that differs
    between ranks, and a collective per call would pair up wrongly across ranks (nccl hangs, gloo
    aborts on a size mismatch). The root is
    resharded after the backward (and its gradient reduce-scattered once, at the end of it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, reshard_after_forward=False, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden")
    return model


def place_teacher(teacher: torch.nn.Module, replicate: bool) -> torch.nn.Module:
    """A frozen teacher for distillation, in place: `replicate` casts it to bf16 (one full copy per rank,
    no collectives; also in a single process, so that one and N processes compute alike); otherwise,
    under torchrun, it is sharded like the student (`shard`: only its root, the embedding, stays
    gathered after the first forward, since it never runs a backward that would reshard it)."""
    teacher.eval().requires_grad_(False)
    if replicate:
        return teacher.to(torch.bfloat16)
    return shard(teacher) if is_distributed() else teacher


def full_model(model: torch.nn.Module, rebuild) -> torch.nn.Module | None:
    """Under FSDP2: the trained model unsharded on rank 0 (`rebuild()` makes an empty plain model of
    the same structure on the CPU; the full state is gathered to rank 0's CPU, a collective every rank
    calls) and None on the other ranks. Without torch.distributed: `model` itself."""
    if not is_distributed():
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = rebuild()
    plain.load_state_dict(sd, strict=True)
    return plain


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


def max_across_ranks(x: int) -> int:
    """The largest of the ranks' x (e.g. a signal one rank caught, so that every rank stops)."""
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)
