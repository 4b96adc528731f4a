"""Test helpers: write GGUF files the way llama.cpp's converter does, and small Gemma vocabularies.

Independent of gemmakit/gguf.py: tensor names come from the gguf package's own HF -> GGUF name map,
norms get the converter's +1, and GGUFWriter records the dims reversed as the format wants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, MODEL_ARCH, get_tensor_name_map
from gguf.quants import quantize

from gemmakit.config import LOCAL
from gemmakit.gguf import GGUFVocab
from gemmakit.model import Gemma

ARCHS = {1: ("gemma", MODEL_ARCH.GEMMA), 2: ("gemma2", MODEL_ARCH.GEMMA2), 3: ("gemma3", MODEL_ARCH.GEMMA3)}
SPACE = "\u2581"


def tiny_vocab(size: int, turn_ids: tuple[int, int] = (5, 6)) -> GGUFVocab:
    """A SentencePiece-style Gemma vocabulary of `size` pieces: specials 0-4, the turn markers at
    `turn_ids`, <unusedN> control pieces, then 256 byte pieces, "\\n" and normal pieces (best first)."""
    normal = [SPACE, "t", "h", "e", "a", "s", "i", "o", "n", "th", SPACE + "t", SPACE + "th", "he",
              SPACE + "the", SPACE + "a", "is", SPACE + "is", "in", "on", "es"]
    body = [(f"<0x{b:02X}>", 6) for b in range(256)] + [("\n", 4)] + [(p, 1) for p in normal]
    entries = [(f"<unused{i}>", 3) for i in range(size)]
    entries[:5] = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 3)]
    entries[turn_ids[0]], entries[turn_ids[1]] = ("<start_of_turn>", 3), ("<end_of_turn>", 3)
    if size - len(body) <= max(turn_ids):
        raise ValueError(f"vocab of {size} is too small")
    entries[size - len(body):] = body
    tokens, types = [e[0] for e in entries], [e[1] for e in entries]
    scores, rank = [], 0
    for kind in types:  # normal pieces: score = -rank (SentencePiece merges the best-scored first)
        scores.append(-float(rank) if kind == 1 else (0.0 if kind == 6 else -1000.0))
        rank += kind == 1
    return GGUFVocab(model="llama", tokens=tokens, scores=scores, types=types, bos_id=2, eos_id=1, unk_id=3,
                     pad_id=0, add_bos=True, add_space_prefix=False)


def write_gguf(path: str | Path, model: Gemma, vocab: GGUFVocab | None = None,
               qtypes: dict[str, GGMLQuantizationType] | None = None, default_qtype=GGMLQuantizationType.F32,
               arch: str | None = None, drop: tuple[str, ...] = (), extra_meta: dict | None = None) -> Path:
    """`model` as llama.cpp's converter writes it. qtypes maps HF names to types (default F32 for norms,
    `default_qtype` for matrices); `drop` leaves GGUF tensors out (to test a missing tensor)."""
    c = model.config
    arch_name, arch_enum = ARCHS[c.generation]
    arch = arch or arch_name
    w = GGUFWriter(str(path), arch)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_base_global)
    if LOCAL in c.layer_types:
        w.add_sliding_window(c.sliding_window)
    if c.rope_scale_global != 1.0:
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scale_global)
    if c.generation == 2:
        w.add_attn_logit_softcapping(c.attn_softcap)
        w.add_final_logit_softcapping(c.final_softcap)
    for key, value in (extra_meta or {}).items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    if vocab is not None:
        w.add_tokenizer_model(vocab.model)
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
        w.add_bos_token_id(vocab.bos_id)
        w.add_eos_token_id(vocab.eos_id)
        w.add_unk_token_id(vocab.unk_id)
        w.add_pad_token_id(vocab.pad_id)
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_space_prefix(vocab.add_space_prefix)
    names = get_tensor_name_map(arch_enum, c.n_layers)
    for key, tensor in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop:
            continue
        data = tensor.detach().float().numpy()
        if "norm" in key:
            data = data + 1.0  # the converter's +1 on every RMSNorm weight
        qtype = (qtypes or {}).get(key, GGMLQuantizationType.F32 if data.ndim == 1 else default_qtype)
        if qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, data.astype(np.float32))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def dequantized(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """What the gguf package's reference dequantizer gives for `data` quantized to `qtype`."""
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(quantize(data, qtype), qtype).reshape(data.shape).astype(np.float32))
