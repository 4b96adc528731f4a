"""gemmakit model -> GGUF file that llama.cpp runs (`gemmakit export MODEL --gguf OUT.gguf --type ...`).

Written with the `gguf` package (the one llama.cpp maintains), as llama.cpp's own converter
(convert_hf_to_gguf.py, classes GemmaModel/Gemma2Model/Gemma3Model) lays a Gemma out:
- tensor names are gemmakit.gguf's mapping reversed; every RMSNorm weight is stored as `1 + w` in
  F32 (llama.cpp's norm multiplies by the stored weight, Gemma by `1 + w`); 1-D tensors stay F32;
- metadata `{arch}.*` for gemma, gemma2 and gemma3, plus two keys the converter leaves to llama.cpp's
  defaults, written so the file says exactly what the model is: the per-layer local/global pattern
  (`attention.sliding_window_pattern`, one bool per layer, True = sliding; llama.cpp reads it) and
  the query scale (`attention.scale` = query_pre_attn_scalar ** -0.5, which the 27B models need);
- the tokenizer: the SentencePiece pieces, scores and piece types (SentencePiece's piece types are
  GGUF's token types), the special ids and Google's chat template. A checkpoint with more embedding
  rows than pieces gets `[PAD{i}]` pieces of type UNUSED for the extra rows, as the converter does.

Types: f32, f16, bf16, and the block formats q8_0 and q4_0 (blocks of 32 along a row: one fp16 scale
each, Q4_0 symmetric with scale = max / -8, quantized by the `gguf` package exactly as llama.cpp's
reference quantize_row_q4_0/q8_0). K-quants (Q4_K, ...) cannot be written by the `gguf` package:
quantize an f32/bf16 export with llama.cpp's `llama-quantize` for those.

The file is streamed tensor by tensor (memory: one tensor, not the model) into a temporary name in
the target's folder and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape, quantize
from tqdm import tqdm

from gemmakit.config import LOCAL, Config
from gemmakit.gguf import _GLOBAL_NAMES, _LAYER_NAMES, _NORMS_G1, _NORMS_G23
from gemmakit.model import Gemma

TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
         "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
# general.file_type (llama.cpp's llama_ftype) for a file whose matrices are all of one type.
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}
ARCHITECTURES = {1: "gemma", 2: "gemma2", 3: "gemma3"}
_UNUSED = 5  # SentencePiece / GGUF token type of a padding piece


def gguf_name(hf: str, generation: int) -> str:
    """GGUF tensor name of an HF parameter name (the inverse of gemmakit.gguf.hf_name)."""
    base, _, suffix = hf.rpartition(".")
    for g, h in _GLOBAL_NAMES.items():
        if base == h:
            return f"{g}.{suffix}"
    parts = base.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        table = {**_LAYER_NAMES, **(_NORMS_G1 if generation == 1 else _NORMS_G23)}
        for g, h in table.items():
            if parts[3] == h:
                return f"blk.{parts[2]}.{g}.{suffix}"
    raise ValueError(f"tensor {hf} has no GGUF name (not part of a Gemma {generation} text model)")


def _stored_type(name: str, tensor: Tensor, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The GGUF type a tensor is written in: norms and other 1-D tensors F32, matrices `qtype`."""
    return GGMLQuantizationType.F32 if tensor.ndim < 2 or name.endswith("norm.weight") else qtype


def _encode(name: str, tensor: Tensor, out_type: GGMLQuantizationType) -> np.ndarray:
    """The array as the file stores it in `out_type` (norms as 1 + w, computed in fp32 as the converter does)."""
    arr = tensor.detach().to(torch.float32).cpu().numpy()
    if name.endswith("norm.weight"):
        return arr + np.float32(1.0)
    if out_type == GGMLQuantizationType.F32:
        return arr
    if out_type == GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return quantize(arr, out_type)  # bf16 bits, or Q8_0/Q4_0 blocks as uint8 rows



def _metadata(w: GGUFWriter, config: Config, arch: str, file_type: int) -> None:
    w.add_name(config.name)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_file_type(file_type)
    if config.generation == 1:
        return
    w.add_attention_scale(float(config.query_pre_attn_scalar) ** -0.5)
    if config.sliding_window is not None:
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern([kind == LOCAL for kind in config.layer_types])
    if config.generation == 2:
        w.add_attn_logit_softcapping(config.attn_softcap)
        w.add_final_logit_softcapping(config.final_softcap)
        return
    w.add_rope_freq_base(config.rope_base_global)
    w.add_rope_freq_base_swa(config.rope_base_local)
    if config.rope_scale_global != 1.0:  # 4B+: positions / 8 on the global layers (128K context)
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scale_global)


def _vocabulary(w: GGUFWriter, tokenizer, rows: int, generation: int) -> None:
    proto = getattr(tokenizer, "proto", None)
    if proto is None:
        raise ValueError("exporting to GGUF needs a SentencePiece tokenizer (tokenizer.model); this model has "
                         "only a tokenizer.json")
    pieces = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    if len(pieces) > rows:
        raise ValueError(f"the tokenizer has {len(pieces)} pieces but the embedding only {rows} rows")
    for i in range(len(pieces), rows):  # checkpoints with spare embedding rows: padding pieces, as the converter
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(_UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(proto.trainer_spec.unk_id if proto.trainer_spec.unk_id >= 0 else 3)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(bool(tokenizer.add_bos_default))
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    from gemmakit.tokenizer import chat_template

    w.add_chat_template(chat_template(generation))


def write_gguf(model: Gemma, tokenizer, path: str | os.PathLike, type: str = "f32", progress: bool = True) -> Path:
    """Write `model` (a text Gemma 1/2/3, any dtype) and its SentencePiece `tokenizer` as a GGUF file.

    type: f32 | f16 | bf16 | q8_0 | q4_0 for every matrix (the embedding included; norms and other
    1-D tensors stay F32). Matrices whose rows are not a multiple of 32 cannot be q8_0/q4_0: ValueError.
    The file appears at `path` only once complete. Returns `path`.
    """
    if type not in TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; gemmakit writes {', '.join(TYPES)} (K-quants such as "
                         "q4_k_m: quantize an f32/bf16 export with llama.cpp's llama-quantize)")
    config = model.config
    if config.vision is not None:
        raise ValueError("exporting a vision model's image tower to GGUF is not supported: export the text "
                         "model of a text-only checkpoint")
    qtype = TYPES[type]
    arch = ARCHITECTURES[config.generation]
    state = {k: v for k, v in model.state_dict().items()}
    names = {k: gguf_name(k, config.generation) for k in state}
    # Shapes and types first (the header lists every tensor before any data), then the data, one at a time.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = GGUFWriter(tmp, arch)
        _metadata(w, config, arch, _FILE_TYPES[type])
        _vocabulary(w, tokenizer, config.vocab_size, config.generation)
        w.add_quantization_version(2)
        planned = []
        for k, t in state.items():
            out_type = _stored_type(k, t, qtype)
            shape = tuple(t.shape)
            if out_type in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0) and shape[-1] % 32:
                raise ValueError(f"tensor {k} has rows of {shape[-1]} values, not a multiple of 32: it cannot be {type}")
            if out_type in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0):
                stored, dtype = quant_shape_to_byte_shape(shape, out_type), np.uint8  # rows of blocks, as bytes
            else:
                dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                         GGMLQuantizationType.BF16: np.uint16}[out_type]
                stored = shape
            nbytes = int(np.prod(stored)) * np.dtype(dtype).itemsize
            w.add_tensor_info(names[k], stored, dtype, nbytes, raw_dtype=out_type)
            planned.append((k, out_type, nbytes))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, out_type, nbytes in tqdm(planned, desc=f"writing {path.name}", unit="tensor", disable=not progress,
                                        leave=False):
            arr = _encode(k, state[k], out_type)
            assert arr.nbytes == nbytes, (k, out_type, arr.nbytes, nbytes)
            w.write_tensor_data(np.ascontiguousarray(arr))
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the file gets the permissions of any new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- `gemmakit export` ---------------------------------------------------------------------------------

def add_parser(sub) -> None:
    s = sub.add_parser("export", help="write a model as a GGUF file that llama.cpp runs",
                       description="Write a model (GGUF file, HF directory, hub id, or `default`) as a GGUF file for "
                                   "llama.cpp: f32, f16, bf16, or the block formats q8_0 and q4_0 (every matrix, the "
                                   "embedding included; norms stay f32). K-quants (q4_k_m, ...) cannot be written by the "
                                   "gguf package: export f32 or bf16 and run llama.cpp's llama-quantize on it.")
    s.add_argument("model", help="the model to export: GGUF file, HF directory, hub id, or `default`")
    s.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (replaced if it exists)")
    s.add_argument("--type", default="bf16", choices=list(TYPES), help="type of the matrices (default bf16)")
    s.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from gemmakit import hub

    out = Path(args.gguf)
    if out.is_dir():
        raise ValueError(f"{out} is a directory; --gguf names the file to write")
    config = hub.load_config(args.model)  # an unknown model or a vision checkpoint fails before loading weights
    if config.vision is not None:
        raise ValueError(f"{config.name} is a vision model: exporting its image tower to GGUF is not supported")
    model, tokenizer = hub.load(args.model, dtype=torch.float32)
    print(f"wrote {write_gguf(model, tokenizer, out, args.type)}")
