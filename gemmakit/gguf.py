"""GGUF (llama.cpp) -> HF-named tensors, a Config from the metadata, and the tokenizer vocabulary.

Parsing and dequantization are the `gguf` package's (the one llama.cpp maintains); this file only
maps names, undoes the converter's changes to the weights and reads the hyperparameters.

Two things the llama.cpp converter does that we undo or rely on:
- every RMSNorm weight is written as `1 + w` (llama.cpp's norm multiplies by the stored weight, Gemma
  by `1 + w`), so we subtract 1 from every `*norm.weight` tensor, exactly once;
- a tensor's dims are stored fastest-first (ne0 = columns), so numpy's row-major shape is the GGUF
  shape reversed, which is already HF's [out_features, in_features].
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from gemmakit.config import GLOBAL, LOCAL, Config, layer_pattern
from gemmakit.model import Gemma, build
from gemmakit.quant import BlockInt8Linear, Q4_0Linear, QuantEmbedding

GENERATIONS = {"gemma": 1, "gemma2": 2, "gemma3": 3}

# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`), per generation. Gemma 1 has
# one norm before the MLP that llama.cpp calls ffn_norm and HF post_attention_layernorm; Gemma 2/3
# keep that HF name for the norm *after* attention and add two around the MLP.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_NORMS_G1 = {"ffn_norm": "post_attention_layernorm"}
_NORMS_G23 = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer as llama.cpp stores it: pieces, scores and SentencePiece piece types."""

    model: str  # tokenizer.ggml.model: "llama" = SentencePiece
    tokens: list[str]
    scores: list[float]
    types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool
    add_space_prefix: bool


def hf_name(gguf_name: str, generation: int) -> str | None:
    """HF parameter name of a GGUF tensor name, or None if gemmakit has no such parameter."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        table = {**_LAYER_NAMES, **(_NORMS_G1 if generation == 1 else _NORMS_G23)}
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{suffix}"
    return None


class _Reader(GGUFReader):
    """GGUFReader that parses arrays in one piece and slices a plain view of its memory map.

    Same bytes, same `contents()`; but the reader makes a numpy view of every array element, and a
    Gemma vocabulary (262k strings, 524k scores and token types) took ~6 s of a Q4_0 file's start-up.
    Here a numeric array is one view and a string array memoryview slices (~0.2 s); np.memmap slices,
    which run Python-level bookkeeping, are replaced by slices of a plain ndarray view.
    """

    def _plain_view(self) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        return plain

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        dtype, count = np.dtype(dtype), int(count)
        arr = self._plain_view()[offset:offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:  # one part for the whole array: contents() lists it
            arr = self._get(offs, nptype, n)
            if arr.shape[0] != n:
                raise ValueError(f"an array of {n:,} values runs past the end of the file")
            return 12 + int(arr.nbytes), [raw_itype, alen, arr], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING:  # arrays of arrays: the reader's own way
            return super()._get_field_parts(orig_offs, raw_type)
        plain = self._plain_view()
        view, end = memoryview(plain), len(plain)
        order = sys.byteorder if self.byte_order == "I" else {"little": "big", "big": "little"}[sys.byteorder]
        parts: list = [raw_itype, alen]
        idxs = []
        for _ in range(n):  # (uint64 length, bytes) per string, as the reader's parts
            size = int.from_bytes(view[offs:offs + 8], order)
            if offs + 8 + size > end:
                raise ValueError("a string runs past the end of the file")
            parts += (view[offs:offs + 8], view[offs + 8:offs + 8 + size])
            idxs.append(len(parts) - 1)
            offs += 8 + size
        return offs - orig_offs, parts, idxs, [GGUFValueType.ARRAY, GGUFValueType.STRING]

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        # The reader slices each tensor's bytes out of the map and reshapes them: a file cut short fails
        # there with numpy's "cannot reshape array of size ...". Name the tensor and the sizes first.
        size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            except (ValueError, KeyError):
                continue  # an unknown type: the reader's own error says which
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise TruncatedError(f"tensor {bytes(name).decode(errors='replace')} needs bytes up to {end:,} "
                                     f"but the file has {size:,}")
        super()._build_tensors(start_offs, fields)


class TruncatedError(ValueError):
    """A tensor's data runs past the end of the file."""


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A GGUFReader, or an error naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return _Reader(path)
    except TruncatedError as e:
        raise ValueError(f"{path} is truncated: {e}") from None
    except Exception as e:  # the reader fails in many ways (struct, numpy, index errors) on a damaged header
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e


def _field(reader: GGUFReader, key: str, default=None):
    f: ReaderField | None = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def architecture(reader: GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in GENERATIONS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; gemmakit reads {', '.join(GENERATIONS)}")
    return arch


def _float(x: float) -> float:
    # Metadata floats are float32: 1e-6 arrives as 9.99999997e-07. Seven significant digits is what a
    # float32 holds, so this gives back the number that was written without changing its float32 value.
    return float(f"{x:.7g}")


def config_from_reader(reader: GGUFReader, name: str = "gguf") -> Config:
    """Config from a GGUF's `{arch}.*` metadata (hyperparameters llama.cpp does not store get the
    published values for that generation)."""
    arch = architecture(reader)
    gen = GENERATIONS[arch]

    def get(key: str, default=None):
        return _field(reader, f"{arch}.{key}", default)

    def need(key: str):
        value = get(key)
        if value is None:
            raise ValueError(f"GGUF metadata has no {arch}.{key}")
        return value

    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    n_layers, d_model, n_heads = int(need("block_count")), int(need("embedding_length")), int(need("attention.head_count"))
    ffn = need("feed_forward_length")
    if isinstance(ffn, list):  # per-layer widths (used by some architectures); Gemma's are all equal
        if len(set(ffn)) != 1:
            raise ValueError(f"per-layer feed_forward_length {sorted(set(ffn))} is not a Gemma 1/2/3 model")
        ffn = ffn[0]
    head_dim = int(get("attention.key_length", d_model // n_heads))
    n_kv = get("attention.head_count_kv", n_heads)

    if gen == 1:
        layer_types = (GLOBAL,) * n_layers
    elif (pattern := get("attention.sliding_window_pattern")) is not None:
        # Either a period (every period-th layer global) or one bool per layer (True = sliding).
        layer_types = (layer_pattern(n_layers, int(pattern)) if not isinstance(pattern, list)
                       else tuple(LOCAL if p else GLOBAL for p in pattern))
    else:
        layer_types = layer_pattern(n_layers, 2 if gen == 2 else 6)

    if (scale := get("attention.scale")) is not None:
        qpas = float(scale) ** -2
    elif gen > 1 and n_layers in {2: (46,), 3: (62,)}[gen]:
        # llama.cpp knows the 27B models only by their depth: they scale queries by
        # (d_model / n_heads) ** -0.5 (144 and 168), the others by head_dim ** -0.5.
        qpas = d_model / n_heads
    else:
        qpas = head_dim
    rope_global = float(get("rope.freq_base", 1_000_000.0 if gen == 3 else 10_000.0))
    # Gemma 3's local layers use base 10k; llama.cpp writes it only in newer files (freq_base_swa).
    rope_local = float(get("rope.freq_base_swa", 10_000.0)) if gen == 3 else rope_global
    scaling, factor = get("rope.scaling.type", "none"), float(get("rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear") or (scaling == "none" and factor != 1.0):
        raise ValueError(f"unsupported RoPE scaling {scaling!r} in GGUF metadata")
    window = get("attention.sliding_window", 4096 if gen == 2 else 512)

    return Config(
        name=name, generation=gen, vocab_size=int(embd.shape[1]), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(n_kv), head_dim=head_dim, intermediate_size=int(ffn),
        layer_types=layer_types, max_seq_len=int(need("context_length")),
        sliding_window=int(window) if LOCAL in layer_types else None,
        query_pre_attn_scalar=_float(qpas) if gen > 1 else None,
        attn_softcap=_float(get("attn_logit_softcapping", 50.0)) if gen == 2 else None,
        final_softcap=_float(get("final_logit_softcapping", 30.0)) if gen == 2 else None,
        post_norms=gen > 1, qk_norm=gen == 3, rope_base_global=rope_global, rope_base_local=rope_local,
        rope_scale_global=factor if scaling == "linear" else 1.0,
        norm_eps=_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
    )


def vocab_from_reader(reader: GGUFReader) -> GGUFVocab:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    n = len(tokens)
    scores = _field(reader, "tokenizer.ggml.scores", [0.0] * n)
    types = _field(reader, "tokenizer.ggml.token_type", [1] * n)
    return GGUFVocab(
        model=_field(reader, "tokenizer.ggml.model", "llama"), tokens=tokens, scores=scores, types=types,
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        unk_id=int(_field(reader, "tokenizer.ggml.unknown_token_id", 3)),
        pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
    )


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """float32 array of one GGUF tensor in numpy (= HF) orientation: the GGUF dims reversed.

    Non-finite values (a damaged scale or float) are an error naming the tensor: no Gemma has them.
    """
    try:
        flat = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"tensor {t.name}: the gguf package cannot dequantize type "
                         f"{GGMLQuantizationType(t.tensor_type).name}") from None
    # F32/F16 data can be a read-only view of the memory-mapped file: copy so the tensor owns its memory.
    arr = np.ascontiguousarray(flat, dtype=np.float32)
    arr = (arr if arr.flags.writeable else arr.copy()).reshape(_shape(t))
    if not np.isfinite(arr).all():
        raise ValueError(f"tensor {t.name} is corrupt: it has non-finite values (at flat index "
                         f"{int(np.flatnonzero(~np.isfinite(arr.ravel()))[0]):,})")
    return arr


def _shape(t: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


# Block types whose blocks gemmakit's quantized modules hold as they are stored (see gemmakit.quant).
BLOCK_TYPES = {GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q8_0: "q8_0"}
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q8_0: 34}  # fp16 scale + 32 values


def native_blocks(reader: GGUFReader) -> bool:
    """Can the file's matrices load as their blocks: is at least one matrix Q4_0 or Q8_0, and every other
    tensor F32, F16, BF16, Q4_0 or Q8_0? Files with K-quants (e.g. Q4_K_M) are dequantized instead."""
    types = {t.tensor_type for t in reader.tensors}
    return (types <= _FLOAT_TYPES | BLOCK_TYPES.keys()
            and any(t.tensor_type in BLOCK_TYPES and len(t.shape) == 2 for t in reader.tensors))


def _block_module(t: ReaderTensor, dtype: torch.dtype) -> nn.Module:
    """quant.Q4_0Linear (Q4_0) or quant.BlockInt8Linear (Q8_0) holding the tensor's blocks: the quantized
    values copied once out of the memory map into the module's buffer (Q8_0's fp16 scales cast to `dtype`;
    Q4_0 keeps them in fp16). No float matrix is made. A non-finite scale (a damaged block) is an error naming the tensor."""
    rows, cols = _shape(t)
    raw = t.data.view(np.ndarray).reshape(rows, cols // 32, _BLOCK_BYTES[t.tensor_type])
    d = np.ascontiguousarray(raw[..., :2]).view(np.float16)[..., 0]  # little-endian, as ggml writes them
    if not np.isfinite(d).all():
        row, block = (int(i[0]) for i in np.nonzero(~np.isfinite(d)))
        raise ValueError(f"tensor {t.name} is corrupt: block {block} of row {row} has the scale {d[row, block]} "
                         f"(a {t.tensor_type.name} scale must be a finite float16)")
    qs = np.ascontiguousarray(raw[..., 2:])  # the copy that becomes the weight buffer (the map is read-only)
    if t.tensor_type == GGMLQuantizationType.Q4_0:
        return Q4_0Linear.from_q4_0_blocks(torch.from_numpy(qs), torch.from_numpy(d), dtype)
    return BlockInt8Linear.from_q8_0_blocks(torch.from_numpy(qs.view(np.int8).reshape(rows, cols)),
                                            torch.from_numpy(d), dtype)


def _tensors(reader: GGUFReader, config: Config, expected: dict[str, torch.Tensor], desc: str, progress: bool
             ) -> Iterator[tuple[str, ReaderTensor]]:
    """(HF name, tensor) of every tensor in the file, each checked against `expected` (the model's state
    dict on meta); then a missing tensor is an error naming it."""
    seen = set()
    for t in tqdm(reader.tensors, desc=desc, unit="tensor", disable=not progress, leave=False):
        name = hf_name(t.name, config.generation)
        if name is None or name not in expected:
            raise ValueError(f"unexpected tensor {t.name} in GGUF file (not part of a Gemma {config.generation} "
                             f"model with this config)")
        if _shape(t) != tuple(expected[name].shape):
            raise ValueError(f"tensor {t.name} has shape {_shape(t)}, expected {tuple(expected[name].shape)}")
        seen.add(name)
        yield name, t
    if missing := [k for k in expected if k not in seen]:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"GGUF file is missing tensor {', '.join(missing[:3])}{more}")


def _float_tensor(t: ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    arr = dequantize_tensor(t)
    if t.name.endswith("norm.weight"):
        arr = arr - 1.0  # the converter stored 1 + w; subtract in fp32, once
    return torch.from_numpy(arr).to(dtype)


def _header(path: str | os.PathLike) -> tuple[GGUFReader, Config, GGUFVocab]:
    """The reader, config and vocabulary of a file whose tensors are read next. The reader's own copy of
    the vocabulary goes: for a Gemma vocabulary (262k pieces as numpy arrays) ~200 MB that would stay
    allocated while the tensors load."""
    reader = open_gguf(path)
    config = config_from_reader(reader, name=Path(path).name)
    vocab = vocab_from_reader(reader)
    for key in [k for k in reader.fields if k.startswith("tokenizer.ggml.")]:
        del reader.fields[key]
    return reader, config, vocab


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True
              ) -> tuple[Config, dict[str, torch.Tensor], GGUFVocab]:
    """(Config, HF-named state dict, vocabulary) of a Gemma 1/2/3 GGUF file, every tensor dequantized.

    Every tensor the model needs must be present and nothing else may be: a missing or unexpected
    tensor is an error that names it.
    """
    reader, config, vocab = _header(path)
    expected = dict(build(config, "meta").state_dict())
    state = {name: _float_tensor(t, dtype)
             for name, t in _tensors(reader, config, expected, f"loading {Path(path).name}", progress)}
    return config, state, vocab


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True,
               native: bool = True) -> tuple[Gemma, GGUFVocab]:
    """(model in eval mode, vocabulary) of a Gemma 1/2/3 GGUF file, on the CPU.

    native, and the file's matrices Q4_0/Q8_0 (`native_blocks`): each Q4_0 matrix becomes a
    quant.Q4_0Linear (q4_0) and each Q8_0 one a quant.BlockInt8Linear holding the file's blocks (the
    embedding a quant.QuantEmbedding around one), the model `quant.quantize(model, "q4_0" / "q8_0")`
    would give, without any float copy of those matrices; Q8_0's scales are in `dtype`, Q4_0's stay fp16
    (in fp32 the weights equal the gguf package's dequantization exactly). Other tensors (norms, float matrices)
    are dequantized to `dtype`. Otherwise (K-quants, or native=False for training, merging,
    exporting) every tensor is dequantized, as load_gguf.
    Errors (ValueError, naming the tensor): a missing, unexpected, misshapen or corrupt tensor.
    """
    reader, config, vocab = _header(path)
    model = build(config, "meta", dtype)
    expected = dict(model.state_dict())
    blocks = native and native_blocks(reader)
    modules = dict(model.named_modules())
    state = {}
    for name, t in _tensors(reader, config, expected, f"loading {Path(path).name}", progress):
        if blocks and t.tensor_type in BLOCK_TYPES and len(t.shape) == 2:
            module = _block_module(t, dtype)
            owner, _, attr = name.removesuffix(".weight").rpartition(".")
            setattr(modules[owner], attr, QuantEmbedding(module) if attr == "embed_tokens" else module)
        else:
            state[name] = _float_tensor(t, dtype)
    # assign: the tensors themselves become the parameters (no second copy); the swapped modules'
    # buffers are already in place, which `strict` would count as missing.
    model.load_state_dict(state, strict=not blocks, assign=True)
    return model.eval(), vocab


def read_gguf_header(path: str | os.PathLike) -> tuple[Config, GGUFVocab]:
    """Config and vocabulary without dequantizing any weights (for `gemmakit info`)."""
    reader = open_gguf(path)
    return config_from_reader(reader, name=Path(path).name), vocab_from_reader(reader)
