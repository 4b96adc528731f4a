"""int8 / int4 / fp8 quantization, applied from outside the model by swapping modules.

`quantize(model, mode)` replaces every `nn.Linear` in the decoder blocks and the tied embedding / LM head
with modules that keep integer weights plus scales and dequantize on the fly. Activations stay in the
model's dtype (weight-only), except in w8a8 (see W8A8Linear) and q4_0 (see Q4_0Linear). Each other
module's `forward` has two paths:

- few rows (decode): a multiply-sum per input row with the dequantization inside it. Under
  torch.compile the rows' reductions become one fused loop that reads the integer weights once, so
  decoding streams the small weights rather than a dequantized copy; on AVX-512 CPUs int8, fp8 and
  q8_0 call gemmakit's kernels there instead (gemmakit/kernels/int8.cpp), as bf16 does (bf16.cpp).
- eager (prefill, perplexity, `--no-compile` decoding): torch's own CPU kernels for quantized weights,
  `aten._weight_int8pack_mm` (int8) and `aten._weight_int4pack_mm_for_cpu` (int4, on a copy of the
  weights in torch's packed layout, made once), which read the integer weights directly. Where they
  are slower (see `_library`), dequantize the matrix a block at a time and use the BLAS matmul.

Formats (`MODES`):
int8:         symmetric per output channel, w = q * scale[row], q in [-127, 127].
int4:         asymmetric per group of `group` (32) inputs, w = q * scale + low, q in [0, 15]; two values per
              byte, element i of a group in the low nibble and element i + group/2 in the high nibble, so
              that the kernel unpacks with two shifts instead of interleaving.
int4-channel: the same, one group per output channel (the Gemma 3 report's "per-channel int4").
q4_0:         llama.cpp's Q4_0: blocks of 32, symmetric, d = max / -8 (max: the value of largest
              magnitude, sign kept) rounded to fp16, q = trunc(w / d + 8.5) in [0, 15], w = d * (q - 8);
              multiplied as llama.cpp multiplies it, with activations rounded to Q8_0 blocks (Q4_0Linear,
              gemmakit's kernel gemmakit/kernels/q4_0.cpp).
q8_0:         llama.cpp's Q8_0: blocks of 32, d = amax / 127 rounded to fp16, q = round(w / d).
fp8:          float8 e4m3 with one fp32 scale per output channel, amax / 448 (the report's "switched fp8").
w8a8:         int8's weights, and activations rounded to int8 per token as they arrive (dynamic, symmetric,
              amax / 127): integer products summed exactly (W8A8Linear), as llama.cpp multiplies its blocks
              with int8-quantized activations. The one format that is not weight-only.
The q4_0/q8_0 grids equal the `gguf` package's reference quantizer (the one llama.cpp's tools use);
q4_0 keeps its fp16 scales; q8_0's are kept in the compute dtype, so in fp32 its weights are GGUF's exactly
and in bf16 its fp16 scales are rounded to bf16. `fake_quantize` gives any format's quantize-then-dequantize (QAT).
"""

from __future__ import annotations

import functools
import math
import mmap
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit import kernels
from gemmakit.model import materialize

MODES = ("int8", "int4", "int4-channel", "q4_0", "q8_0", "fp8", "w8a8")
TILE = 32  # rows per tile of a 16-bit packed LM head: two AVX-512 registers of fp32 running sums
DECODE_ROWS = 16  # at most this many input rows use the fused decode path (batch 8 decode included)
# A float or int8 layer (not the LM head) leaves the fused loop for the library's product above this many
# rows. Compiled, bf16, side by side on the 2-core AVX-512 machine, [2048, 640] and [640, 2048]: 8 rows
# fused 0.19 / 0.28 ms, F.linear 0.17 / 0.16 (int8: 0.20 / 0.27 fused, _weight_int8pack_mm 0.18 / 0.17);
# 16 rows fused 0.49 / 0.91, F.linear 0.21 / 0.21. At 4 rows and fewer the fused loop wins or ties. The
# LM head keeps the fused loop to DECODE_ROWS (16 rows: packed bf16 51 ms against the tiles' matmul 66,
# int8 55 against _weight_int8pack_mm 67), and so do the int4 / q8_0 / fp8 layers, whose library paths
# would dequantize inside the compiled step.
FUSED_LAYER_ROWS = 4
BLOCK_ELEMENTS = 1 << 23  # weights (de)quantized at a time outside the fused path (32 MiB in fp32)


def _fuse(x: Tensor, rows: int = DECODE_ROWS) -> bool:
    """Take the fused path (x has at most `rows` rows)? Only under torch.compile: run eagerly, the
    broadcast would materialize the whole [rows, out, in] product."""
    return torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= rows


# Rows up to which torch's int8/int4 kernels beat dequantize-then-BLAS, per activation dtype. Measured
# side by side in one process on the 2-core AVX-512 (avx512_bf16) machine, one thread, [2048, 640] and
# [640, 2048] in bf16: 1 row 0.07 ms (int4 and int8 kernels); 32 rows int4 kernel 1.0 ms against 1.6
# dequantized, int8 1.1 against 0.8; 64 rows about even; 128 rows 4.0 / 4.5 against 2.7 / 2.0; 512 rows
# (a prefill chunk) 15.8 / 18.0 against 7.4 / 6.8, where bf16 BLAS on float weights takes 6.3. With fp32
# activations their loop is not vectorized (1 row: 2.2 ms): only for decoding, where it was measured
# ahead of dequantizing the whole matrix per token.
LIBRARY_ROWS = {torch.bfloat16: 48, torch.float32: DECODE_ROWS}


def _library(x: Tensor) -> bool:
    """Use torch's int8/int4 kernels for x? Eagerly on the CPU, without autograd (they have no
    backward), for the dtypes and row counts where they were measured faster (LIBRARY_ROWS)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling() and not x.requires_grad
            and x.numel() // max(x.shape[-1], 1) <= LIBRARY_ROWS.get(x.dtype, 0))


def _blocked(x: Tensor, out_features: int, rows: Callable[[int, int], Tensor], multiple: int = 1) -> Tensor:
    """x @ W.T with W dequantized `rows(start, end)` a block at a time: the full float copy of a big
    matrix (the 262,144-row LM head) never exists at once. Blocks start at multiples of `multiple`."""
    blocks = _row_blocks(out_features, x.shape[-1], multiple)
    if len(blocks) == 1:
        return F.linear(x, rows(0, out_features))
    # Every block's product goes into one output allocated up front. A small result allocated after
    # each block's temporaries would sit above them on the heap, so that glibc could neither reuse nor
    # return their memory: the eager LM head then grew the process by 600 MiB, in some runs only.
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_empty(x2.shape[0], out_features)
    for start, end in blocks:
        torch.mm(x2, rows(start, end).T, out=out[:, start:end])
    return out.view(*x.shape[:-1], out_features)


def _row_blocks(out_features: int, in_features: int, multiple: int = 1) -> list[tuple[int, int]]:
    """(start, end) row ranges of about BLOCK_ELEMENTS weights, for work done a block at a time.

    Quantizing uses them too: whole-matrix fp32 temporaries of the 262,144-row embedding are 640 MiB
    each, a few at once, and loading an int8 model peaked at 2.9 GiB instead of 1.9.
    """
    block = max(1, BLOCK_ELEMENTS // in_features // multiple) * multiple
    return [(i, min(i + block, out_features)) for i in range(0, out_features, block)]


# -- unquantized ------------------------------------------------------------------------------------

class DenseLinear(nn.Module):
    """nn.Linear's weight (shared, not copied) with the fused decode path: `fuse_decode` swaps it in.

    torch's bf16 matrix-vector product is slow on CPUs without bf16 instructions, and its few-row
    products (batched decode) are slow in any dtype; inductor hands F.linear to those same library
    calls, whereas a multiply-sum compiles to a streaming reduction.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        # bf16 weights on an AVX-512 CPU: gemmakit's kernel (kernels/bf16.cpp) in the compiled step.
        self.kernel = self.weight.dtype == torch.bfloat16 and kernels.bf16()

    def dequantize(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel and self.weight.dtype == torch.bfloat16 and _fuse(x, FUSED_LAYER_ROWS) and not x.requires_grad:
            return torch.ops.gemmakit.bf16_linear(x, self.weight)
        return dense_matmul(x, self.weight)


def dense_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T: compiled with few rows, a multiply-sum per row accumulated in fp32; else BLAS.

    Even for one fp32 row: on the benchmark's 2-core AVX-512 machine BLAS's fp32 matrix-vector product
    read the 262,144-row LM head at 11 GB/s, the fused loop at 27 GB/s.
    """
    if _fuse(x, FUSED_LAYER_ROWS):
        w = weight.float()
        return _per_row(x, lambda row: (w * row).sum(-1))
    return F.linear(x, weight)


def _per_row(x: Tensor, product: Callable[[Tensor], Tensor], widen_in_loop: bool = False) -> Tensor:
    """Apply `product` (one fp32 input row [in] -> [out]) to every row of x [..., in]; [..., out] in x's dtype.

    The input is read from a buffer in fp32, or with `widen_in_loop` in x's own dtype and widened inside
    the product's loop (which sets how wide inductor vectorizes it: see Int8Linear.fused).

    One reduction per row, written separately: inductor fuses reductions over the same weight into one
    loop that loads and converts each weight element once and feeds every row from registers. Written
    as one [out, rows, in] broadcast instead, it may vectorize across the rows and read the weights as
    scalars (batch 8 then runs 40x slower than batch 1).
    """
    x2 = x.reshape(-1, x.shape[-1])
    x2 = materialize(x2 if widen_in_loop else x2.float())
    out = torch.stack([product(x2[r].float()) for r in range(x2.shape[0])])
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


# -- int8 -------------------------------------------------------------------------------------------

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: (q [out, in] int8, scale [out] fp32); computed in fp32."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """int8 weights with one scale per output channel (Fp8Linear: the same with float8 weights).

    `weight` is [out, in], or, once `retile(TILE)` has run (fuse_decode does it for the tied LM head
    before compiling), tiles [out / tile, in, tile] as PackedEmbedding lays out a float head: compiled,
    the decode product then runs through a tile with `tile` running sums in vector registers instead of
    one 640-element row at a time with a horizontal sum per row. On the 2-core AVX-512 machine the Gemma 3
    270M's int8 head [262144, 640] with one bf16 row, compiled: 5.7 ms tiled, 7.4 ms by rows (torch's
    int8 kernel, eagerly: 12.7 ms).
    Eagerly a tiled matrix is dequantized a block at a time (torch's int8 kernel needs rows), so only the
    compiled decode step's head is tiled. The state dict always holds the [out, in] matrix.
    """

    QDTYPE = torch.int8
    OPS = ("int8_linear", "int8_tiles")  # gemmakit's kernels for rows and for tiles of TILE rows

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tile = 1
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.QDTYPE))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        # On an AVX-512 CPU: gemmakit's kernels (kernels/int8.cpp, OPS) in the compiled step.
        self.kernel = kernels.int8()

    @staticmethod
    def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_int8(w)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.weight.dtype)
        for start, end in _row_blocks(linear.out_features, linear.in_features):
            m.weight[start:end], m.scale[start:end] = cls.quantize_rows(linear.weight.detach()[start:end])
        return m

    def retile(self, tile: int) -> None:
        """Lay `weight` out as tiles of `tile` rows (1: plain rows), in place. A tile's rows fill the same
        bytes in both layouts, so the weights move one block at a time, never a second whole copy."""
        tile = math.gcd(self.out_features, tile)
        if tile == self.tile:
            return
        if self.tile > 1 and tile > 1:  # from one tiling to another: through rows
            self.retile(1)
        flat = self.weight.reshape(-1)  # a view: both layouts are contiguous
        group = self.in_features * max(tile, self.tile)  # elements of one tile
        step = max(1, BLOCK_ELEMENTS // group) * group
        with torch.no_grad():
            for i in range(0, flat.numel(), step):
                part = flat[i:i + step]
                if tile > 1:  # rows -> tiles (through a block-sized temporary)
                    part.copy_(part.view(-1, tile, self.in_features).transpose(1, 2).reshape(-1))
                else:  # tiles -> rows
                    part.copy_(part.view(-1, self.in_features, self.tile).transpose(1, 2).reshape(-1))
        # .data: the same buffer object (relocate's mark stays with it), only its shape changes
        self.weight.data = flat.view(self.out_features, self.in_features) if tile == 1 else \
            flat.view(self.out_features // tile, self.in_features, tile)
        self.tile = tile

    def _q(self, start: int = 0, end: int | None = None) -> Tensor:
        """The quantized values of rows start:end [end - start, in]."""
        end = self.out_features if end is None else end
        if self.tile == 1:
            return self.weight[start:end]
        t0 = start // self.tile
        return unpack_rows(self.weight[t0:-(-end // self.tile)])[start - t0 * self.tile:end - t0 * self.tile]

    def dequantize(self, start: int = 0, end: int | None = None) -> Tensor:
        return self._q(start, end).to(self.scale.dtype) * self.scale[start:end, None]

    def rows(self, tokens: Tensor) -> Tensor:
        q = self.weight[tokens] if self.tile == 1 else self.weight[tokens // self.tile, :, tokens % self.tile]
        return q.to(self.scale.dtype) * self.scale[tokens][..., None]

    def fused(self, x: Tensor) -> Tensor:
        if self.kernel and self.tile in (1, TILE) and not x.requires_grad:
            op = getattr(torch.ops.gemmakit, self.OPS[self.tile > 1])
            return op(x, self.weight, self.scale)
        # Sum in fp32 whatever the activation dtype; the per-row scale applies once to the sum.
        w, scale = self.weight.float(), self.scale.float()
        if self.tile > 1:
            # The input read in its own dtype, widened in the loop: inductor then vectorizes bf16 work 32
            # lanes wide, as two fp32 registers of running sums (one tile of 32 rows in one pass, two
            # independent sums); from an fp32 buffer it went 16 wide, through each tile twice.
            return _per_row(x, lambda row: (w * row[:, None]).sum(1).flatten() * scale, widen_in_loop=True)
        return _per_row(x, lambda row: (w * row).sum(-1) * scale)

    def forward(self, x: Tensor) -> Tensor:
        # torch's int8 product beats the fused loop from a few rows on, in bf16 (see FUSED_LAYER_ROWS).
        if _fuse(x, FUSED_LAYER_ROWS if self.QDTYPE == torch.int8 and x.dtype == torch.bfloat16 else DECODE_ROWS):
            return self.fused(x)
        if _library(x) and self.QDTYPE == torch.int8 and self.tile == 1:  # y = x @ (q * scale).T; scale in x's dtype
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight,
                                                  self.scale.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features)
        return _blocked(x, self.out_features, self.dequantize, self.tile)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tile > 1:
            destination[prefix + "weight"] = self._q().clone()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        key = prefix + "weight"
        q = state_dict.get(key)
        if self.tile > 1 and q is not None and tuple(q.shape) == (self.out_features, self.in_features):
            state_dict[key] = pack_rows(q, self.tile)  # load_state_dict passes its own copy of the dict
        super()._load_from_state_dict(state_dict, prefix, *args)


# -- int4 -------------------------------------------------------------------------------------------

def quantize_int4(w: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric int4: (packed [out, in/group, group/2] uint8, scale and low [out, in/group])."""
    out, inp = w.shape
    if inp % group or group % 2:
        raise ValueError(f"int4 needs the input width ({inp}) to be a multiple of the group size ({group})")
    g = w.float().reshape(out, inp // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed, scale, low


def quantize_q4_0(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """llama.cpp's Q4_0 (ggml's quantize_row_q4_0_ref, in fp32) as (packed, scale, low), GGUF's block order
    (packed [out, in/32, 16]): scale = d (fp16-rounded, as stored in a GGUF block), low = -8 d."""
    out, inp = w.shape
    if inp % 32:
        raise ValueError(f"q4_0 needs the input width ({inp}) to be a multiple of 32")
    g = w.float().reshape(out, inp // 32, 32)
    peak = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # largest magnitude, its sign kept
    d = peak / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(g * inv + 8.5).clamp(0, 15).to(torch.uint8)  # from the unrounded d, as the reference
    d = d[..., 0].to(torch.float16).float()
    return q[..., :16] | (q[..., 16:] << 4), d, -8 * d


def _unpack_int4(packed: Tensor) -> tuple[Tensor, Tensor]:
    """(first half, second half) of every group, as uint8 values 0..15."""
    return packed & 15, packed >> 4


# torch's int4 CPU kernel (aten._weight_int4pack_mm_for_cpu) reads its weights interleaved in blocks of
# KERNEL_ROWS rows: in the [rows / 64, in, 32] view of its [rows, in / 2] bytes, byte (b, k, i) holds
# input k of row 64 b + i in its low nibble and of row 64 b + 32 + i in its high one (what
# aten._convert_weight_to_int4pack_for_cpu makes; tested against it).
KERNEL_ROWS = 64
KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes the kernel takes


def to_kernel_layout(q: Tensor) -> Tensor:
    """4-bit values q [n, in] (uint8 0..15) -> the kernel's bytes [n rounded up to 64, in / 2]; rows
    past n are zero."""
    n, k = q.shape
    pad = -n % KERNEL_ROWS
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
    v = q.view(-1, 2, 32, k)  # [block, half, i, k]
    return (v[:, 0] | (v[:, 1] << 4)).transpose(1, 2).contiguous().view(n + pad, k // 2)


def from_kernel_layout(packed: Tensor) -> Tensor:
    """The kernel's bytes [rows, in / 2] (rows a multiple of 64) -> 4-bit values [rows, in] (uint8)."""
    rows, half = packed.shape
    v = packed.view(rows // KERNEL_ROWS, 2 * half, 32).transpose(1, 2)  # [block, i, k]
    return torch.stack([v & 15, v >> 4], dim=1).reshape(rows, 2 * half)


def _group_values(q: Tensor, group: int) -> Tensor:
    """Group-layout bytes [n, in/group, group/2] -> 4-bit values [n, in] (element i of a group in the low
    nibble of byte i, element i + group/2 in the high one: GGUF's Q4_0 block order)."""
    lo, hi = _unpack_int4(q)
    return torch.cat([lo, hi], dim=-1).reshape(q.shape[0], -1)


def _group_bytes(q: Tensor, group: int) -> Tensor:
    """The inverse of _group_values: 4-bit values [n, in] -> group-layout bytes [n, in/group, group/2]."""
    g = q.view(q.shape[0], -1, group)
    return g[..., :group // 2] | (g[..., group // 2:] << 4)


class Int4Linear(nn.Module):
    """4-bit weights in groups of `group` inputs, w = q * scale + low (q in 0..15): int4 and int4-channel.

    One layout serves every path: the 4-bit values live in `packed`, the layout of torch's int4 CPU
    kernel (see KERNEL_ROWS), which the decode step reads directly, compiled or not, with bf16
    activations (it streams 4-bit weights at memory speed, where a compiled unpack-and-multiply loop
    reached a third of that); more rows than LIBRARY_ROWS dequantize 64-row blocks for BLAS (prefill), and
    fp32 decoding runs a compiled loop over the same bytes. The kernel's per-group scales and zeros
    (`scales_and_zeros`, [in / kernel group, rows, 2] in the scales' dtype) are derived from `scale` and
    `low`; an int4-channel layer gives them per group of 32 (its scale repeated).

    The state dict keeps GGUF's Q4_0 block order (`weight` [out, in/group, group/2] uint8, `scale`, `low`
    [out, in/group]), as does the `weight` property, computed on use (export, tests; never a hot path).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, group: int = 32,
                 kernel: bool = True) -> None:
        """`kernel`: keep torch's kernel's scales and zeros (inference); False for a base that only ever
        dequantizes (QLoRA), saving their memory (2 values per 32 weights)."""
        super().__init__()
        if in_features % group or group % 2:
            raise ValueError(f"int4 needs the input width ({in_features}) to be a multiple of the group size "
                             f"({group})")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        # The kernel's group: the module's, or for wider groups (int4-channel) 32 with the scale repeated.
        self.kernel_group = (group if group in KERNEL_GROUPS else 32 if group % 32 == 0 else 0) if kernel else 0
        rows = out_features + (-out_features % KERNEL_ROWS)
        n = in_features // group
        self.register_buffer("packed", torch.zeros(rows, in_features // 2, dtype=torch.uint8), persistent=False)
        self.register_buffer("scale", torch.ones(out_features, n, dtype=dtype))
        self.register_buffer("low", torch.zeros(out_features, n, dtype=dtype))
        shape = (in_features // self.kernel_group, rows, 2) if self.kernel_group else (0, 0, 2)
        self.register_buffer("scales_and_zeros", torch.zeros(shape, dtype=dtype), persistent=False)

    def _set(self, values: Tensor, scale: Tensor, low: Tensor, start: int = 0) -> None:
        """Rows start:start + len(values) from 4-bit values [n, in] and their scales; `start` and n are
        multiples of 64 or n reaches the last row."""
        end = start + values.shape[0]
        self.packed[start:start + (-(end - start) % KERNEL_ROWS) + end - start] = to_kernel_layout(values)
        self.scale[start:end], self.low[start:end] = scale, low
        self._kernel_scales(start, end)

    def _kernel_scales(self, start: int = 0, end: int | None = None) -> None:
        """scales_and_zeros of rows start:end from scale and low. The kernel computes w = (q - 8) * scale
        + zero, so zero = low + 8 * scale (in fp32, one rounding to the scales' dtype)."""
        if not self.kernel_group:
            return
        end = self.out_features if end is None else end
        scale, low = self.scale[start:end].float(), self.low[start:end].float()
        repeat = self.group // self.kernel_group
        sz = torch.stack([scale, low + 8 * scale], dim=-1).repeat_interleave(repeat, dim=1)  # [n, in/kg, 2]
        self.scales_and_zeros[:, start:end] = sz.transpose(0, 1).to(self.scales_and_zeros.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = 32, kernel: bool = True) -> Int4Linear:
        """Quantized min-max per group (quantize_int4)."""
        m = cls(linear.in_features, linear.out_features, linear.weight.dtype, group, kernel)
        for start, end in _row_blocks(linear.out_features, linear.in_features, KERNEL_ROWS):
            q, scale, low = quantize_int4(linear.weight.detach()[start:end], group)
            m._set(_group_values(q, group), scale, low, start)
        return m

    @property
    def weight(self) -> Tensor:
        """The 4-bit values in GGUF's block order [out, in/group, group/2] uint8 (a new tensor)."""
        return _group_bytes(from_kernel_layout(self.packed)[:self.out_features], self.group)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        key = prefix + "weight"
        q = state_dict.get(key)
        if q is not None:
            state_dict = {k: v for k, v in state_dict.items() if k != key}
            want = (self.out_features, self.in_features // self.group, self.group // 2)
            if tuple(q.shape) != want or q.dtype != torch.uint8:
                args[-1].append(f"size mismatch for {key}: copying a param with shape {tuple(q.shape)} "
                                f"({q.dtype}), the shape in current model is {want} (torch.uint8)")
                return
            with torch.no_grad():
                self.packed.copy_(to_kernel_layout(_group_values(q, self.group)))
        elif args[1]:  # strict: the missing key is reported by the default loader
            args[2].append(key)
        super()._load_from_state_dict(state_dict, prefix, *args)
        with torch.no_grad():
            self._kernel_scales()

    def _values(self, start: int, end: int) -> Tensor:
        """4-bit values of rows start:end [end - start, in] (uint8), from the 64-row blocks holding them."""
        b0, b1 = start // KERNEL_ROWS * KERNEL_ROWS, -(-end // KERNEL_ROWS) * KERNEL_ROWS
        return from_kernel_layout(self.packed[b0:b1])[start - b0:end - b0]

    def rows(self, tokens: Tensor) -> Tensor:
        """Dequantized rows `tokens` [...] -> [..., in_features] (the embedding lookup), read from the
        kernel's layout: row t is nibble t // 32 % 2 of column t % 32 in block t // 64."""
        k = self.in_features
        block = self.packed.view(-1, k, 32)
        b, i = tokens // KERNEL_ROWS, tokens % KERNEL_ROWS
        byte = block[b[..., None], torch.arange(k, device=tokens.device), (i % 32)[..., None]]  # [..., in]
        q = (byte >> (4 * (i // 32)).to(torch.uint8)[..., None]) & 15
        g = q.view(*tokens.shape, k // self.group, self.group).to(self.scale.dtype)
        return (g * self.scale[tokens][..., None] + self.low[tokens][..., None]).reshape(*tokens.shape, k)

    def dequantize(self, start: int = 0, end: int | None = None) -> Tensor:
        end = self.out_features if end is None else end
        q = self._values(start, end).view(end - start, -1, self.group).to(self.scale.dtype)
        w = q * self.scale[start:end, :, None] + self.low[start:end, :, None]
        return w.reshape(end - start, self.in_features)

    def _kernel(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                                       self.kernel_group, self.scales_and_zeros)
        if y.shape[1] != self.out_features:  # rows padded to 64 (the published sizes never are)
            y = y[:, :self.out_features].contiguous()
        return y.view(*x.shape[:-1], self.out_features)

    def _kernel_takes(self, x: Tensor) -> bool:
        return bool(self.kernel_group) and x.dtype == self.scales_and_zeros.dtype

    def fused(self, x: Tensor) -> Tensor:
        """x @ W.T for the compiled decode step: torch's kernel with bf16 activations (see the class
        docstring); with fp32 ones a compiled loop over the same bytes, the scales applied in fp32."""
        if x.dtype == torch.bfloat16 and self._kernel_takes(x):
            return self._kernel(x)
        k, g, n = self.in_features, self.group, self.out_features
        p = self.packed.view(-1, k // g, g, 32)  # [block, group, element, i]
        rows = self.packed.shape[0]

        def per_block(t: Tensor) -> Tensor:  # [out, in/group] -> [block, group, 2 halves, 32]
            t = F.pad(t.float(), (0, 0, 0, rows - n))
            return t.view(-1, 2, 32, k // g).permute(0, 3, 1, 2)

        scale, low = per_block(self.scale), per_block(self.low)
        w_lo = (p & 15).float() * scale[:, :, None, 0] + low[:, :, None, 0]  # rows 64 b + i
        w_hi = (p >> 4).float() * scale[:, :, None, 1] + low[:, :, None, 1]  # rows 64 b + 32 + i

        def product(row: Tensor) -> Tensor:
            xg = row.view(1, k // g, g, 1)
            y = torch.stack([(w_lo * xg).sum((1, 2)), (w_hi * xg).sum((1, 2))], dim=1)  # [block, 2, 32]
            return y.reshape(rows)[:n]

        return _per_row(x, product)

    def forward(self, x: Tensor) -> Tensor:
        if _fuse(x):
            return self.fused(x)
        if _library(x) and self._kernel_takes(x):
            return self._kernel(x)
        return _blocked(x, self.out_features, self.dequantize, KERNEL_ROWS)


# -- q4_0 -------------------------------------------------------------------------------------------

Q4_0_TILE = 16  # rows per tile of the Q4_0 kernel's layout


def quantize_q8_0_activations(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [m, in] as llama.cpp's Q8_0 blocks of 32 (ggml's quantize_row_q8_0, in fp32): (q [m, in/32, 32]
    int8 = round(x * 127 / amax) to nearest even, d [m, in/32] fp32 = amax / 127 rounded to fp16, sums
    [m, in/32] int32 of each block's q)."""
    xb = x.float().view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1)
    # 127 / amax as one division (a scalar over a tensor would be 127 * (1 / amax), an ulp apart, and
    # activations on a grid, such as a quantized embedding's rows, meet rounding ties often)
    inv = torch.where(amax != 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None]).to(torch.int8)
    return q, (amax / 127).half().float(), q.sum(-1, dtype=torch.int32)


def q4_0_reference(x: Tensor, values: Tensor, d: Tensor) -> Tensor:
    """What the Q4_0 kernel computes, in torch: x [m, in] times 4-bit values [out, in] (uint8 0..15) with
    fp16 scales d [out, in/32]: y [m, out] fp32, y = sum over blocks b of d * dx * (q . xq - 8 sx), the
    activations rounded to Q8_0 (quantize_q8_0_activations), the blocks added in order. The integer dot
    products are exact in fp32 (at most 32 x 15 x 127 < 2^24); the kernel fuses each block's multiply-add,
    which this does not, so the two can differ in the last bit."""
    q, dx, sx = quantize_q8_0_activations(x)
    out = torch.zeros(x.shape[0], values.shape[0])
    for b in range(q.shape[1]):
        dots = q[:, b].float() @ values[:, 32 * b:32 * b + 32].float().T - 8 * sx[:, b:b + 1].float()
        out += dots * (d[:, b].float() * dx[:, b:b + 1])
    return out


def to_tile_layout(values: Tensor) -> Tensor:
    """4-bit values [n, in] (uint8 0..15, n a multiple of 16) -> the Q4_0 kernel's bytes [n/16, in/32, 256]:
    byte 64 l + 4 j + t of block b holds input 32 b + 4 l + t of row j (low nibble) and 32 b + 16 + 4 l + t
    (high nibble); see kernels/q4_0.cpp."""
    n, k = values.shape
    v = values.view(n // Q4_0_TILE, Q4_0_TILE, k // 32, 2, 4, 4)  # [tile, j, b, half, l, t]
    return (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).reshape(n // Q4_0_TILE, k // 32, 256)


def from_tile_layout(packed: Tensor) -> Tensor:
    """The inverse of to_tile_layout: bytes [tiles, in/32, 256] -> 4-bit values [16 tiles, in] (uint8)."""
    tiles, blocks, _ = packed.shape
    v = packed.view(tiles, blocks, 4, Q4_0_TILE, 4).permute(0, 3, 1, 2, 4)  # [tile, j, b, l, t]
    return torch.stack([v & 15, v >> 4], dim=3).reshape(tiles * Q4_0_TILE, blocks * 32)


class Q4_0Linear(nn.Module):
    """llama.cpp's Q4_0 (blocks of 32 inputs, w = d (q - 8), q in 0..15, one fp16 scale d per block),
    multiplied as llama.cpp multiplies it: the activations are rounded to Q8_0 blocks as they arrive and
    each block's product is an exact integer dot product (gemmakit's kernel, kernels/q4_0.cpp; with
    AVX-512 VNNI one instruction multiplies 16 rows by 4 inputs). y [..., out] in x's dtype.

    The arithmetic is the same in every build of the kernel and for any number of rows, so eager,
    compiled, prefill and batched decoding give each row the same bits. Side by side on the 2-core
    AVX-512 VNNI machine, one bf16 row: the 270M's [262144, 640] LM head in 3.0 ms (31 GB/s) against
    4.9 ms for torch's int4 kernel (aten._weight_int4pack_mm_for_cpu, bf16 activations), a [2048, 640]
    layer 0.016 ms against 0.040; 128 rows (prefill) 0.59 ms against bf16 BLAS's 0.84.

    Buffers (not in the state dict): `packed` [out/16, in/32, 256] uint8 (to_tile_layout), `d` [out/16,
    in/32, 16] the fp16 scales' bits as int16 (so that model.to(dtype) leaves them alone) and `compute`,
    empty, in the compute dtype. The state dict holds GGUF's Q4_0 blocks: `weight` [out, in/32, 16] uint8
    (element i of a block in the low nibble of byte i, element i + 16 in the high one) and `scale` [out,
    in/32] fp16. With gradients (training through a q4_0 model) the product is float, on the dequantized
    weights; without a C++ compiler, q4_0_reference.
    """

    group = 32

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        if in_features % 32:
            raise ValueError(f"q4_0 needs the input width ({in_features}) to be a multiple of 32")
        self.in_features, self.out_features = in_features, out_features
        tiles = -(-out_features // Q4_0_TILE)
        self.register_buffer("packed", torch.zeros(tiles, in_features // 32, 256, dtype=torch.uint8), persistent=False)
        self.register_buffer("d", torch.zeros(tiles, in_features // 32, Q4_0_TILE, dtype=torch.int16), persistent=False)
        self.register_buffer("compute", torch.empty(0, dtype=dtype), persistent=False)
        self.kernel = kernels.load()  # loaded before any compiled step that calls it

    def _set(self, values: Tensor, d: Tensor, start: int = 0) -> None:
        """Rows start:start + n from 4-bit values [n, in] and scales d [n, in/32]; start is a multiple of 16
        and n too unless it reaches the last row."""
        n = values.shape[0]
        pad = -n % Q4_0_TILE
        if pad:
            values, d = F.pad(values, (0, 0, 0, pad)), F.pad(d.float(), (0, 0, 0, pad))
        t0, t1 = start // Q4_0_TILE, (start + n + pad) // Q4_0_TILE
        self.packed[t0:t1] = to_tile_layout(values)
        bits = d.to(torch.float16).view(torch.int16)
        self.d[t0:t1] = bits.view(t1 - t0, Q4_0_TILE, -1).transpose(1, 2)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Q4_0Linear:
        """Quantized by llama.cpp's Q4_0 rule (quantize_q4_0), a block of rows at a time."""
        m = cls(linear.in_features, linear.out_features, linear.weight.dtype)
        for start, end in _row_blocks(linear.out_features, linear.in_features, Q4_0_TILE):
            q, d, _ = quantize_q4_0(linear.weight.detach()[start:end])
            m._set(_group_values(q, 32), d, start)
        return m

    @classmethod
    def from_q4_0_blocks(cls, qs: Tensor, d: Tensor, dtype: torch.dtype) -> Q4_0Linear:
        """From GGUF Q4_0 blocks as stored: qs [out, in/32, 16] uint8 (element i of a block in the low nibble
        of byte i, element i + 16 in the high one), d [out, in/32] float16. No float matrix is made."""
        out, blocks, half = qs.shape
        if qs.dtype != torch.uint8 or half != 16 or tuple(d.shape) != (out, blocks):
            raise ValueError(f"Q4_0 blocks must be uint8 [out, in/32, 16] with scales [out, in/32], got "
                             f"{qs.dtype} {list(qs.shape)} and {list(d.shape)}")
        m = cls(blocks * 32, out, dtype)
        m._set_blocks(qs, d)
        return m

    def _set_blocks(self, qs: Tensor, d: Tensor) -> None:
        """Every row from GGUF's Q4_0 blocks qs [out, in/32, 16] and scales d [out, in/32], a block of rows
        at a time."""
        for start, end in _row_blocks(self.out_features, self.in_features, Q4_0_TILE):
            self._set(_group_values(qs[start:end], 32), d[start:end], start)

    def _scales(self) -> Tensor:
        """d [out, in/32] float16."""
        return self.d.view(torch.float16).transpose(1, 2).reshape(-1, self.in_features // 32)[:self.out_features]

    @property
    def weight(self) -> Tensor:
        """GGUF's Q4_0 nibbles [out, in/32, 16] uint8 (a new tensor)."""
        return _group_bytes(from_tile_layout(self.packed)[:self.out_features], 32)

    @property
    def scale(self) -> Tensor:
        """d [out, in/32] in the compute dtype (a new tensor)."""
        return self._scales().to(self.compute.dtype)

    @property
    def low(self) -> Tensor:
        return -8 * self.scale

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"], destination[prefix + "scale"] = self.weight, self._scales().clone()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        q, d = state_dict.get(prefix + "weight"), state_dict.get(prefix + "scale")
        missing_keys += [prefix + k for k, v in (("weight", q), ("scale", d)) if v is None]
        want = (self.out_features, self.in_features // 32, 16)
        if q is not None and (tuple(q.shape) != want or q.dtype != torch.uint8):
            error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(q.shape)} "
                              f"({q.dtype}), the shape in current model is {want} (torch.uint8)")
        elif d is not None and tuple(d.shape) != want[:2]:
            error_msgs.append(f"size mismatch for {prefix}scale: copying a param with shape {tuple(d.shape)}, "
                              f"the shape in current model is {want[:2]}")
        elif q is not None and d is not None:
            with torch.no_grad():
                self._set_blocks(q, d)

    def _values(self, start: int, end: int) -> Tensor:
        """4-bit values of rows start:end [end - start, in] (uint8)."""
        t0 = start // Q4_0_TILE
        return from_tile_layout(self.packed[t0:-(-end // Q4_0_TILE)])[start - t0 * Q4_0_TILE:end - t0 * Q4_0_TILE]

    def dequantize(self, start: int = 0, end: int | None = None) -> Tensor:
        """Rows start:end of w = d (q - 8) [end - start, in] in the compute dtype."""
        end = self.out_features if end is None else end
        q = self._values(start, end).view(end - start, -1, 32).float() - 8
        return (q * self._scales()[start:end, :, None].float()).reshape(end - start, -1).to(self.compute.dtype)

    def rows(self, tokens: Tensor) -> Tensor:
        """Dequantized rows `tokens` [...] -> [..., in] (the embedding lookup), read from the tiles."""
        tile, j = tokens // Q4_0_TILE, tokens % Q4_0_TILE
        p = self.packed.view(self.packed.shape[0], -1, 4, Q4_0_TILE, 4)  # [tile, b, l, j, t]
        byte = p[tile, :, :, j, :]  # [..., b, l, t]
        q = torch.cat([(byte & 15).flatten(-2), (byte >> 4).flatten(-2)], dim=-1).float() - 8  # [..., b, 32]
        d = self.d.view(torch.float16)[tile, :, j].float()  # [..., b]
        return (q * d[..., None]).flatten(-2).to(self.compute.dtype)

    def fused(self, x: Tensor) -> Tensor:
        """The LM head's product (QuantEmbedding.attend): the kernel's, as for any number of rows."""
        return self(x)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            return _blocked(x, self.out_features, self.dequantize, Q4_0_TILE)
        if x.device.type == "cpu" and self.kernel:
            return torch.ops.gemmakit.q4_0_linear(x, self.packed, self.d.view(torch.float16), self.out_features)
        x2 = x.reshape(-1, self.in_features)
        y = torch.cat([q4_0_reference(x2, self._values(s, e), self._scales()[s:e])
                       for s, e in _row_blocks(self.out_features, self.in_features, Q4_0_TILE)], dim=-1)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


# -- q8_0 and fp8 ------------------------------------------------------------------------------------

def quantize_q8_0(w: Tensor) -> tuple[Tensor, Tensor]:
    """llama.cpp's Q8_0 (quantize_row_q8_0_ref, in fp32): (q [out, in] int8, d [out, in/32] fp16-rounded)."""
    out, inp = w.shape
    if inp % 32:
        raise ValueError(f"q8_0 needs the input width ({inp}) to be a multiple of 32")
    g = w.float().reshape(out, inp // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(g * inv).to(torch.int8)  # round half away from zero in C; ties are measure-zero here
    return q.reshape(out, inp), d[..., 0].to(torch.float16).float()


class BlockInt8Linear(nn.Module):
    """q8_0: int8 weights with one scale per block of 32 inputs (llama.cpp's Q8_0 blocks, unpacked)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, in_features // 32, dtype=dtype))
        # On an AVX-512 CPU: gemmakit's kernel (kernels/int8.cpp's q8_0_linear) in the compiled step.
        self.kernel = kernels.int8()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BlockInt8Linear:
        m = cls(linear.in_features, linear.out_features, linear.weight.dtype)
        for start, end in _row_blocks(linear.out_features, linear.in_features):
            m.weight[start:end], m.scale[start:end] = quantize_q8_0(linear.weight.detach()[start:end])
        return m

    @classmethod
    def from_q8_0_blocks(cls, qs: Tensor, d: Tensor, dtype: torch.dtype) -> BlockInt8Linear:
        """A q8_0 module around GGUF Q8_0 blocks as stored: qs [out, in] int8, d [out, in/32] float16
        scales; w = d q. `qs` becomes `weight` without a copy; the scales are cast to `dtype` (exact in fp32)."""
        out, inp = qs.shape
        if qs.dtype != torch.int8 or inp % 32 or tuple(d.shape) != (out, inp // 32):
            raise ValueError(f"Q8_0 blocks must be int8 [out, in] with scales [out, in/32], got "
                             f"{qs.dtype} {list(qs.shape)} and {list(d.shape)}")
        with torch.device("meta"):
            m = cls(inp, out, dtype)
        m.weight, m.scale = qs, d.to(dtype)
        return m

    def dequantize(self, start: int = 0, end: int | None = None) -> Tensor:
        q = self.weight[start:end]
        w = q.view(q.shape[0], -1, 32).to(self.scale.dtype) * self.scale[start:end, :, None]
        return w.reshape(q.shape[0], self.in_features)

    def rows(self, tokens: Tensor) -> Tensor:
        q = self.weight[tokens].view(*tokens.shape, -1, 32).to(self.scale.dtype)
        return (q * self.scale[tokens][..., None]).reshape(*tokens.shape, self.in_features)

    def fused(self, x: Tensor) -> Tensor:
        if self.kernel and not x.requires_grad:
            return torch.ops.gemmakit.q8_0_linear(x, self.weight, self.scale)
        w, scale = self.weight.float().view(self.out_features, -1, 32), self.scale.float()
        return _per_row(x, lambda row: ((w * row.view(-1, 32)).sum(-1) * scale).sum(-1))

    def forward(self, x: Tensor) -> Tensor:
        if _fuse(x):
            return self.fused(x)
        return _blocked(x, self.out_features, self.dequantize)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q [out, in] float8_e4m3fn, scale [out] fp32 = amax / 448): w ~ q * scale, per output channel."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(Int8Linear):
    """fp8: float8 e4m3 weights with one scale per output channel (the Gemma 3 report's switched fp8).
    The compiled decode step reads them with gemmakit's kernels (kernels/int8.cpp, on AVX-512 CPUs:
    widened through float16, exactly); eagerly they are widened a block at a time for BLAS."""

    QDTYPE = torch.float8_e4m3fn
    OPS = ("fp8_linear", "fp8_tiles")

    def dequantize(self, start: int = 0, end: int | None = None) -> Tensor:
        # torch widens float8 one element at a time (~4 ns per weight on the 2-core AVX-512 machine, which
        # halved fp8's prefill against bf16); gemmakit's kernel gives the same values 16 at a time.
        if self.kernel:
            return torch.ops.gemmakit.fp8_dequantize(self._q(start, end).contiguous(), self.scale[start:end])
        return super().dequantize(start, end)

    @staticmethod
    def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_fp8(w)


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """w8a8's dynamic activation quantization of x [..., in]: per token (row), symmetric, in fp32:
    (q [..., in] int8 in [-127, 127], scale [..., 1] fp32 = amax / 127), x ~ q * scale."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


# Integers below 2^24 are exact in fp32, so a sum of `in` products of int8 values is exact in any order
# (as torch._int_mm's int32 sum is) while in * 127 * 127 < 2^24: up to 1040 inputs.
EXACT_FP32_INPUTS = (1 << 24) // (127 * 127)
W8A8_LOOP_ROWS = 1  # the head's fp32 loop (compiled) up to this many rows; torch._int_mm from there on
W8A8_BLOCK = 1 << 22  # outputs (rows x columns) of torch._int_mm scaled at a time


class W8A8Linear(Int8Linear):
    """w8a8: int8 weights per output channel (int8's `weight` and `scale`, the same state dict) times
    activations rounded to int8 per token at run time (quantize_activations):
    y = (q_x . q_w) * scale_x * scale_w [..., out] in x's dtype; vLLM's "W8A8 int8, dynamic per-token".

    The integer products are summed exactly, in int32 by torch._int_mm (oneDNN's int8 GEMM, with VNNI
    where the CPU has it), so the result does not depend on the path or the batch: eager, compiled,
    prefill, and a decode step over 16 sequences give each sequence the same logits, bit for bit. Only
    the compiled LM head with one row (decoding one stream) runs an fp32 loop instead, as fast as the
    int8 head by rows and faster there than oneDNN's one-row product; it is exact too (see
    EXACT_FP32_INPUTS; wider models use torch._int_mm).
    Side by side, 2-core AVX-512 VNNI machine, the 270M's [262144, 640] head: 16 rows 17.6 ms against
    int8's 55 (its fp32 loop) and 65 (aten._weight_int8pack_mm); one bf16 row compiled, 9.2 ms with
    torch._int_mm and 6.1 ms with the loop; [2048, 640] layers, one row, compiled: 0.041 ms against int8's
    0.047. On the CPU: torch._int_mm's CUDA kernel wants more than 16 rows.
    """

    def retile(self, tile: int) -> None:
        """Rows stay rows: torch._int_mm reads [out, in]."""

    def fused(self, x: Tensor) -> Tensor:
        """The LM head under compile (QuantEmbedding.attend)."""
        return self._product(x, _fuse(x, W8A8_LOOP_ROWS) and self.in_features <= EXACT_FP32_INPUTS)

    def forward(self, x: Tensor) -> Tensor:
        return self._product(x, loop=False)

    def _product(self, x: Tensor, loop: bool) -> Tensor:
        q, scale_x = quantize_activations(x.reshape(-1, self.in_features))
        scale_w = self.scale.float()
        if loop:
            w = self.weight.float()
            y = _per_row(q.float(), lambda row: (w * row).sum(-1)) * scale_x * scale_w
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        # float(sum) * scale_x * scale_w, by blocks of outputs small enough for the cache: a prefill's
        # [512, 262144] logits in one piece took longer to scale than to compute.
        step = max(1, W8A8_BLOCK // q.shape[0])
        parts = [(torch._int_mm(q, self.weight[i:i + step].t()) * scale_x).mul_(scale_w[i:i + step]).to(x.dtype)
                 for i in range(0, self.out_features, step)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.view(*x.shape[:-1], self.out_features)


def fake_quantize(w: Tensor, mode: str) -> Tensor:
    """`w` [out, in] rounded to `mode`'s grid and back (fp32 arithmetic, w's dtype out): the weights the
    quantized model would use, as quantization-aware training sees them (no gradient defined here: wrap
    it in a straight-through estimator). Equal to quantize(model, mode)'s dequantized weights."""
    if mode in ("int8", "w8a8"):  # w8a8's weights are int8's (its activations are rounded at run time)
        q, s = quantize_int8(w)
        out = q.float() * s[:, None]
    elif mode in ("int4", "int4-channel", "q4_0"):
        group = w.shape[1] if mode == "int4-channel" else 32
        packed, s, low = quantize_q4_0(w) if mode == "q4_0" else quantize_int4(w, group)
        lo, hi = _unpack_int4(packed)
        q = torch.cat([lo, hi], dim=-1).float()
        out = (q * s[..., None] + low[..., None]).reshape(w.shape)
    elif mode == "q8_0":
        q, d = quantize_q8_0(w)
        out = (q.float().view(w.shape[0], -1, 32) * d[..., None]).reshape(w.shape)
    elif mode == "fp8":
        q, s = quantize_fp8(w)
        out = q.float() * s[:, None]
    else:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    return out.to(w.dtype)


QUANTIZED = (Int8Linear, Int4Linear, Q4_0Linear, BlockInt8Linear, Fp8Linear, W8A8Linear)


# -- tied embedding / LM head --------------------------------------------------------------------------

class PackedEmbedding(nn.Module):
    """The tied embedding / LM head laid out for the compiled decode step (`fuse_decode` swaps it in).

    The table [vocab, d_model] is stored as tiles [vocab / tile, d_model, tile]: each tile holds `tile`
    consecutive rows side by side, element by element. The decode product then runs through a tile in
    one contiguous pass with `tile` running sums in vector registers, instead of one short row at a time
    with a horizontal sum per row. On the benchmark's 2-core AVX-512 machine this read the 262,144-row
    head about 20% faster (at 50 GB/s: 45-50 GB/s against 39-40), and it is 62% of a Gemma 3 270M
    step's bytes. The same values, no second copy; `state_dict()` gives (and loads) the checkpoint's
    [vocab, d_model] `weight`, so saving a packed model writes the usual checkpoint.

    An fp32 table keeps its rows (tile 1, [vocab, d_model, 1] is the table itself): with rows twice as
    long, the row-at-a-time loop was the faster one there (fp32 decode side by side at ~55 GB/s: 30-35
    against 22-31 tokens/s tiled).
    """

    def __init__(self, table: Tensor, tile: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        if tile is None:
            tile = 1 if table.dtype == torch.float32 else TILE
        self.tile = math.gcd(self.num_embeddings, tile)  # 32 for every Gemma vocabulary
        # Packed straight into fresh memory (huge pages where the OS gives them: see relocate), one copy.
        packed = _block(table.nbytes).view(table.dtype) if table.device.type == "cpu" else torch.empty_like(table)
        packed = pack_rows(table.detach(), self.tile,
                           out=packed.view(self.num_embeddings // self.tile, self.embedding_dim, self.tile))
        self.weight = nn.Parameter(packed, requires_grad=table.requires_grad)
        # bf16 tiles of 32 on an AVX-512 CPU: gemmakit's kernel (kernels/bf16.cpp) in the compiled step.
        self.kernel = table.dtype == torch.bfloat16 and self.tile == TILE and kernels.bf16()

    def unpacked(self) -> Tensor:
        """The table as [vocab, d_model] (a copy)."""
        return unpack_rows(self.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.weight[tokens // self.tile, :, tokens % self.tile]

    def attend(self, h: Tensor) -> Tensor:
        """Logits h @ E^T [..., vocab]."""
        if self.kernel and self.weight.dtype == torch.bfloat16 and _fuse(h) and not h.requires_grad:
            return torch.ops.gemmakit.bf16_tiles(h, self.weight)
        if _fuse(h):
            w = self.weight.float()
            return _per_row(h, lambda row: (w * row[:, None]).sum(1).flatten())
        if self.tile == 1:
            return F.linear(h, self.weight[..., 0])
        x = h.reshape(-1, h.shape[-1])
        if x.shape[0] <= DECODE_ROWS:  # a prefill's last positions: one small product per tile
            out = torch.matmul(x, self.weight).transpose(0, 1).reshape(x.shape[0], self.num_embeddings)
        else:  # many rows (perplexity): BLAS on tiles unpacked a block at a time
            out = _blocked(x, self.num_embeddings, self._rows, multiple=self.tile)
        return out.view(*h.shape[:-1], self.num_embeddings)

    def _rows(self, start: int, end: int) -> Tensor:
        return unpack_rows(self.weight[start // self.tile:end // self.tile])

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        table = self.unpacked()
        destination[prefix + "weight"] = table if keep_vars else table.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        key = prefix + "weight"
        table = state_dict.get(key)
        # Only a table of this module's shape is packed; any other is left for nn.Module's size-mismatch
        # error, which names the key and both shapes. (load_state_dict passes its own copy of the dict.)
        if table is not None and table.shape == (self.num_embeddings, self.embedding_dim):
            state_dict[key] = pack_rows(table, self.tile)
        super()._load_from_state_dict(state_dict, prefix, *args)


def pack_rows(table: Tensor, tile: int, out: Tensor | None = None) -> Tensor:
    """[rows, cols] -> [rows / tile, cols, tile]: element j of row t*tile + k at [t, j, k] (into `out`)."""
    tiles = table.view(-1, tile, table.shape[1]).transpose(1, 2)
    return tiles.contiguous() if out is None else out.copy_(tiles)


def unpack_rows(packed: Tensor) -> Tensor:
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])


class QuantEmbedding(nn.Module):
    """The tied embedding as a quantized matrix: rows looked up for the input, `attend` for the head."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.table = linear  # [vocab, d_model] viewed as a Linear from d_model to vocab

    @property
    def weight(self) -> Tensor:  # dtype/device queries only (e.g. Gemma.dtype): the compute dtype
        return self.table.compute if isinstance(self.table, Q4_0Linear) else self.table.scale

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table.rows(tokens)

    def attend(self, h: Tensor) -> Tensor:
        """Logits h @ E^T, without materializing E."""
        # The head keeps the fused loop up to DECODE_ROWS rows, where a layer would have left it.
        return self.table.fused(h) if _fuse(h) else self.table(h)


def quantize(model: nn.Module, mode: str, group: int = 32) -> nn.Module:
    """Swap the model's Linear layers and tied embedding for `mode` (one of MODES) in place. Layers already
    quantized in `mode` (a Q4_0/Q8_0 GGUF's blocks) stay as they are; those in another format are
    dequantized and quantized again, one matrix at a time."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    return _swap(model, mode, group)


def fuse_decode(model: nn.Module) -> nn.Module:
    """Give a model the fused decode path in place (no-op if already swapped): the Linear layers share
    their weights; the tied embedding is re-laid out as tiles (`PackedEmbedding`; an int8/fp8 head:
    `Int8Linear.retile`). Quantized layers keep their own layouts."""
    return _swap(model, None, 0)


def quantized_mode(m: nn.Module) -> str:
    """The MODES format a quantized module (one of QUANTIZED) stores."""
    if isinstance(m, Int4Linear):
        return "int4-channel" if m.group == m.in_features else "int4"
    return {Fp8Linear: "fp8", Int8Linear: "int8", BlockInt8Linear: "q8_0", W8A8Linear: "w8a8", Q4_0Linear: "q4_0"}[type(m)]


def _dequantized(m: nn.Module) -> nn.Linear:
    """A float Linear with `m`'s dequantized weights (in its scales' dtype), to be quantized again."""
    linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(m.dequantize(), requires_grad=False)
    return linear


def _swap(model: nn.Module, mode: str | None, group: int) -> nn.Module:
    """Swap the decoder's Linear layers (not a vision tower's) and its tied embedding."""
    # generate() swaps under inference mode, whose tensors could never be trained afterwards.
    with torch.inference_mode(False), torch.no_grad():
        return _swap_modules(model, mode, group)


def _swap_modules(model: nn.Module, mode: str | None, group: int) -> nn.Module:
    def convert(linear: nn.Linear | DenseLinear) -> nn.Module:
        if mode is None:
            return linear if isinstance(linear, DenseLinear) else DenseLinear(linear)
        if mode == "int8":
            return Int8Linear.from_linear(linear)
        if mode == "w8a8":
            return W8A8Linear.from_linear(linear)
        if mode == "q8_0":
            return BlockInt8Linear.from_linear(linear)
        if mode == "fp8":
            return Fp8Linear.from_linear(linear)
        if mode == "q4_0":
            return Q4_0Linear.from_linear(linear)
        return Int4Linear.from_linear(linear, linear.in_features if mode == "int4-channel" else group)

    body = model.model
    for parent in list(body.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, DenseLinear)):
                setattr(parent, name, convert(child))
            elif mode is not None and isinstance(child, QUANTIZED) and quantized_mode(child) != mode:
                setattr(parent, name, convert(_dequantized(child)))  # e.g. a Q4_0 GGUF's blocks, asked for int8
    emb = body.embed_tokens
    if mode is None and type(emb) is QuantEmbedding and isinstance(emb.table, Int8Linear):
        # The compiled head runs through tiles (see Int8Linear) as wide as inductor's vectors of the
        # compute dtype: 32 lanes for 16-bit activations, 16 for fp32.
        emb.table.retile(TILE if emb.table.scale.dtype.itemsize == 2 else TILE // 2)
    placed = []  # tensors already in fresh memory
    if mode is None and type(emb) is nn.Embedding:
        body.embed_tokens = PackedEmbedding(emb.weight)
        placed.append(body.embed_tokens.weight)
    elif mode is not None and isinstance(emb, (nn.Embedding, PackedEmbedding)):
        as_linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
        # An nn.Embedding's table is shared (no copy); a packed one is unpacked first.
        as_linear.weight = emb.weight if isinstance(emb, nn.Embedding) else nn.Parameter(emb.unpacked())
        body.embed_tokens = QuantEmbedding(convert(as_linear))
    elif mode is not None and type(emb) is QuantEmbedding and quantized_mode(emb.table) != mode:
        body.embed_tokens = QuantEmbedding(convert(_dequantized(emb.table)))
    relocate(model, placed)
    return model


HUGE_PAGE = 2 << 20  # bytes of one x86-64 / arm64 transparent huge page


def relocate(model: nn.Module, placed: Sequence[Tensor] = ()) -> None:
    """Move the model's CPU tensors (parameters and buffers, the same objects) into fresh memory: one
    block per decoder layer, in the order the layer reads them, and one block per other tensor; blocks
    of 2 MiB and more in huge pages where Linux gives them (an anonymous mapping advised MADV_HUGEPAGE
    before anything touches it, so that copying in faults 2 MiB pages).

    Decoding reads every weight once per token, so its speed is the speed at which the weights stream
    from memory. In 4 KiB pages every 4 KiB of weights costs a TLB miss and a restart of the hardware
    prefetcher; a layer's small matrices, allocated apart, also break the stream. Side by side in one
    process on the 2-core AVX-512 machine (read bandwidth ~31 GB/s), Gemma 3 270M bf16, one row: the
    LM head [262144, 640] 14.4 ms in 4 KiB pages, 11.1 ms in huge pages; the 126 layer products 10.1 ms
    as loaded, 8.8 ms in one huge-page block per layer. One block per layer (not per model) keeps the
    extra memory while copying at one layer's weights.

    It also ends views into a memory-mapped checkpoint: as long as one is alive the whole mapping stays,
    and every page that quantizing or packing read stays resident (a tiled fp32 head, when tried, kept
    its old 640 MiB table besides the tiled one). `placed`: tensors to leave where they are; tensors moved
    by an earlier call stay too (a model decoded again, or quantized and then compiled, is not copied again)."""
    for t in placed:
        t._gemmakit_moved = True

    def tensors(module: nn.Module) -> list[Tensor]:
        # A layer's tensors are marked when moved, so the model's own pass skips them.
        return [t for t in [*module.parameters(), *module.buffers()]
                if t.device.type == "cpu" and t.numel() and not getattr(t, "_gemmakit_moved", False)]

    with torch.no_grad():
        for layer in model.model.layers:
            _move(tensors(layer))
        for t in tensors(model):
            _move([t])


def _move(tensors: list[Tensor]) -> None:
    """Copy `tensors` (contiguous) one after another into one new block, 64-byte aligned, and point each
    at its copy (`.data`: the same Parameter / buffer objects)."""
    sizes = [-(-t.nbytes // 64) * 64 for t in tensors]
    block = _block(sum(sizes))
    offset = 0
    for t, size in zip(tensors, sizes):
        view = block[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t.data)
        t.data = view
        t._gemmakit_moved = True
        offset += size


def _block(nbytes: int) -> Tensor:
    """nbytes of new memory as uint8, in huge pages where the OS gives them (see relocate)."""
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    # Private (a shared anonymous mapping is shared memory, which gets no huge pages); unmapped when the
    # last view of it goes.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    memory = torch.frombuffer(region, dtype=torch.uint8)
    start = -memory.data_ptr() % HUGE_PAGE  # huge pages map 2 MiB-aligned addresses
    return memory[start:start + nbytes]


def weight_bytes(config, mode: str | None, dtype_bytes: int = 2, group: int = 32) -> int:
    """Bytes of the text decoder's weights as stored: `mode` None (dtype_bytes each), "int8" or "int4".

    Norm weights stay in the compute dtype; scales (and int4 lows) are stored in the compute dtype.
    """
    counts = config.param_counts()
    d, hd = config.d_model, config.head_dim
    # (rows, cols) of every matrix that gets quantized: the embedding and the per-layer projections.
    mats = [(config.vocab_size, d)] + config.n_layers * [
        (config.n_heads * hd, d), (config.n_kv_heads * hd, d), (config.n_kv_heads * hd, d), (d, config.n_heads * hd),
        (config.intermediate_size, d), (config.intermediate_size, d), (d, config.intermediate_size)]
    matrix_params = sum(r * c for r, c in mats)
    other = counts["embedding"] + counts["non_embedding"] - matrix_params
    if mode is None:
        return (matrix_params + other) * dtype_bytes
    if mode in ("int8", "w8a8"):
        return matrix_params + sum(r for r, _ in mats) * dtype_bytes + other * dtype_bytes
    if mode == "int4":
        return matrix_params // 2 + 2 * (matrix_params // group) * dtype_bytes + other * dtype_bytes
    if mode == "q4_0":  # one fp16 scale per block of 32
        return matrix_params // 2 + (matrix_params // 32) * 2 + other * dtype_bytes
    if mode == "int4-channel":
        return matrix_params // 2 + 2 * sum(r for r, _ in mats) * dtype_bytes + other * dtype_bytes
    if mode == "q8_0":
        return matrix_params + (matrix_params // 32) * dtype_bytes + other * dtype_bytes
    if mode == "fp8":
        return matrix_params + sum(r for r, _ in mats) * dtype_bytes + other * dtype_bytes
    raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
