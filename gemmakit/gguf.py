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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderField, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from gemmakit.config import GLOBAL, LOCAL, Config, layer_pattern
from gemmakit.model import build

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
    """GGUFReader that slices a plain ndarray view of its memory map instead of the np.memmap itself.

    Same bytes, same results; but every np.memmap slice runs Python-level bookkeeping, and a Gemma
    vocabulary (262k strings) costs a million slices while parsing the header: this halves load time.
    """

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dtype, count = np.dtype(dtype), int(count)
        arr = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A GGUFReader, or an error naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    size = path.stat().st_size
    try:
        reader = _Reader(path)
    except Exception as e:  # the reader fails in many ways (struct, numpy, index errors) on a damaged header
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    # The reader memory-maps tensor data without checking that it is all there: a file cut short
    # would give short arrays (or garbage) later. Check every tensor's extent against the file size.
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes:,} "
                             f"but the file has {size:,}")
    return reader


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
    """float32 array of one GGUF tensor in numpy (= HF) orientation: the GGUF dims reversed."""
    try:
        flat = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"tensor {t.name}: the gguf package cannot dequantize type "
                         f"{GGMLQuantizationType(t.tensor_type).name}") from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    # F32/F16 data can be a read-only view of the memory-mapped file: copy so the tensor owns its memory.
    arr = np.ascontiguousarray(flat, dtype=np.float32)
    return (arr if arr.flags.writeable else arr.copy()).reshape(shape)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True
              ) -> tuple[Config, dict[str, torch.Tensor], GGUFVocab]:
    """(Config, HF-named state dict, vocabulary) of a Gemma 1/2/3 GGUF file.

    Every tensor the model needs must be present and nothing else may be: a missing or unexpected
    tensor is an error that names it.
    """
    reader = open_gguf(path)
    config = config_from_reader(reader, name=Path(path).name)
    vocab = vocab_from_reader(reader)
    expected = dict(build(config, "meta").state_dict())
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"loading {Path(path).name}", unit="tensor", disable=not progress,
                  leave=False):
        name = hf_name(t.name, config.generation)
        if name is None or name not in expected:
            raise ValueError(f"unexpected tensor {t.name} in GGUF file (not part of a Gemma {config.generation} "
                             f"model with this config)")
        arr = dequantize_tensor(t)
        if t.name.endswith("norm.weight"):
            arr = arr - 1.0  # the converter stored 1 + w; subtract in fp32, once
        if arr.shape != tuple(expected[name].shape):
            raise ValueError(f"tensor {t.name} has shape {arr.shape}, expected {tuple(expected[name].shape)}")
        state[name] = torch.from_numpy(arr).to(dtype)
    if missing := [k for k in expected if k not in state]:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"GGUF file is missing tensor {', '.join(missing[:3])}{more}")
    return config, state, vocab


def read_gguf_header(path: str | os.PathLike) -> tuple[Config, GGUFVocab]:
    """Config and vocabulary without dequantizing any weights (for `gemmakit info`)."""
    reader = open_gguf(path)
    return config_from_reader(reader, name=Path(path).name), vocab_from_reader(reader)
