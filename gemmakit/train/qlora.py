"""QLoRA: LoRA on a frozen base stored as int8 or int4, dequantized a block at a time at use.

`quantize_base(model, "int8" | "int4")` replaces the decoder's Linear layers with `QuantLinear` and the
tied embedding / LM head with `QuantTable`, holding quant.py's formats (Int8Linear: int8 per output row;
Int4Linear: 4-bit, asymmetric per group of 32 inputs), and releases each float weight as soon as it is
quantized. The base is frozen; `lora.apply_lora` then wraps the QuantLinear layers like Linear ones.

Inside the forward AND the backward, a QuantLinear dequantizes its weight a block of rows at a time
(about quant.BLOCK_ELEMENTS weights: a whole projection of a small model, 1/20 of the 262,144-row
head) and multiplies by it (`_DequantMatmul`). The backward needs only dL/dx = dL/dy @ W (the base is
frozen: no weight gradient), so it dequantizes again instead of keeping the float weight from the
forward: no float copy of a matrix outlives its product. So a step holds the integer weights plus one
float block, where LoRA on a bf16 base holds 2 bytes per weight throughout (bench/qlora_memory.py).

Precision: scales, norms and activations stay in the base's dtype: bf16 as `--quantize-base` loads it
(QLoRA's bf16 compute dtype; the adapters' weights and optimizer stay fp32, the losses take the logits
in fp32), fp32 for an fp32 model. Either way a QLoRA model computes exactly what LoRA on the dequantized
weights computes (tested in fp32); only the weights' rounding to int8/int4 differs from LoRA on the float
base.

Without a gradient to compute (evaluation, on-policy sampling), the layers run quant.py's own inference
paths (its int8/int4 kernels), as `--quantize` inference does.

The trained adapter is saved in PEFT's format like any other (lora.save_adapter) and is meant for the
UNQUANTIZED base: `--adapter DIR` or `gemmakit merge-adapter` fold it into the float weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gemmakit.quant import BLOCK_ELEMENTS, Int4Linear, Int8Linear, QuantEmbedding

Quantized = Int8Linear | Int4Linear
MODES = ("int8", "int4")  # the base formats QLoRA trains on (quant.py has more for inference)


def _blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of about BLOCK_ELEMENTS weights."""
    step = max(1, BLOCK_ELEMENTS // cols)
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a product runs in: autocast's when it is on (as F.linear would), else x's."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


# One buffer per (dtype, device) that every block is dequantized into. A fresh block per product (up to
# 32 MiB, hundreds per step) lands on glibc's heap once its mmap threshold has grown, and the freed
# blocks stay resident: on a 6-layer model of the 270M's shapes the steps' peak RSS went from 1.05 GiB
# with fresh blocks to 0.94 GiB with the workspace (--chunk 64).
_WORKSPACE: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _dequantize(q: Quantized, start: int, end: int, dtype: torch.dtype) -> Tensor:
    """Rows start:end of q's weight [end - start, in] in `dtype`, written into the shared workspace (valid
    until the next call). The same values as q.dequantize (tested), rounded once to `dtype`."""
    n = (end - start) * q.in_features
    key = (dtype, q.scale.device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        buf = _WORKSPACE[key] = torch.empty(max(n, BLOCK_ELEMENTS), dtype=dtype, device=q.scale.device)
    if isinstance(q, Int8Linear):
        return torch.mul(q.weight[start:end], q.scale[start:end, None], out=buf[:n].view(end - start, q.in_features))
    w = buf[:n].view(end - start, q.in_features // q.group, q.group)
    w.copy_(q._values(start, end).view_as(w))  # the 4-bit values, from the kernel layout's 64-row blocks
    w.mul_(q.scale[start:end, :, None]).add_(q.low[start:end, :, None])
    return w.view(end - start, q.in_features)


def _dequant_mm(x: Tensor, q: Quantized, dtype: torch.dtype) -> Tensor:
    """x @ W.T [..., out] in `dtype`, W dequantized a block of rows at a time (no autograd)."""
    x2 = x.reshape(-1, q.in_features).to(dtype)
    out = x2.new_empty(x2.shape[0], q.out_features)
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are set here, explicitly
        for start, end in _blocks(q.out_features, q.in_features):
            torch.mm(x2, _dequantize(q, start, end, dtype).T, out=out[:, start:end])
    return out.view(*x.shape[:-1], q.out_features)


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T with W quantized: dequantized block by block in the forward, and again in the
    backward for dL/dx = dL/dy @ W (nothing saved but a reference to the module)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Quantized) -> Tensor:  # type: ignore[override]
        ctx.q, ctx.dtype, ctx.x_dtype = q, _compute_dtype(x), x.dtype
        return _dequant_mm(x, q, ctx.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, dtype = ctx.q, ctx.dtype
        g = grad.reshape(-1, q.out_features).to(dtype)
        # Summed over the blocks in fp32 whatever the product's dtype (the head has ~20 blocks).
        gx = torch.zeros(g.shape[0], q.in_features, dtype=torch.float32, device=g.device)
        with torch.autocast(grad.device.type, enabled=False):
            for start, end in _blocks(q.out_features, q.in_features):
                gx += torch.mm(g[:, start:end], _dequantize(q, start, end, dtype))
        return gx.to(ctx.x_dtype).view(*grad.shape[:-1], q.in_features), None


def quant_matmul(x: Tensor, q: Quantized) -> Tensor:
    """x [..., in] @ W.T -> [..., out] for a quantized W: differentiable in x (the backward dequantizes
    again, block by block); without a gradient to track, quant.py's inference path (its kernels) when
    the dtypes are the stored ones, else the block-wise product."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _DequantMatmul.apply(x, q)
    dtype = _compute_dtype(x)
    if dtype == x.dtype == q.scale.dtype:
        return q(x)
    return _dequant_mm(x, q, dtype)


class QuantLinear(nn.Module):
    """A frozen Linear layer stored quantized (`q`: quant.Int8Linear or Int4Linear, buffers only)."""

    def __init__(self, q: Quantized) -> None:
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.q = q

    @property
    def device(self) -> torch.device:
        return self.q.scale.device

    def forward(self, x: Tensor) -> Tensor:
        return quant_matmul(x, self.q)


class QuantTable(QuantEmbedding):
    """The tied embedding / LM head stored quantized: rows looked up for the input (no gradient: the
    table is frozen and nothing before it trains), `attend` (the head) differentiable in h."""

    def attend(self, h: Tensor) -> Tensor:
        return quant_matmul(h, self.table)


def quantized(weight: Tensor, mode: str, group: int = 32) -> Quantized:
    """A float [out, in] weight in quant.py's `mode` format (quant.py quantizes a block of rows at a
    time, in fp32; scales in the weight's dtype). Raises ValueError for an unknown mode, or an input
    width that is not a multiple of the int4 group."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shared, not copied
    with torch.no_grad():
        return Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, group, kernel=False)


def quantize_base(model: nn.Module, mode: str, group: int = 32) -> nn.Module:
    """Make `model` a frozen quantized base for QLoRA, in place: the decoder's Linear layers become
    QuantLinear, the tied embedding a QuantTable (`mode` "int8" or "int4"), each float weight dropped
    once quantized. Scales, norms and activations keep the model's dtype (bf16 as `--quantize-base`
    loads the base: QLoRA's bf16 compute dtype; an fp32 model stays fp32). Returns the model."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    body = model.model
    emb = body.embed_tokens
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"the embedding is a {type(emb).__name__}, not a float nn.Embedding: quantize an "
                         f"unquantized model")
    for parent in list(body.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, QuantLinear(quantized(child.weight, mode, group)))
    body.embed_tokens = QuantTable(quantized(emb.weight, mode, group))
    return model.requires_grad_(False)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
