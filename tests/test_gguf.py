"""GGUF import: every tensor type, orientation, the +1 on norms, config from metadata, bad files.

Files are written here the way llama.cpp's converter writes them (tests/gguf_files.py), from tiny
random models whose true weights we know.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from conftest import random_model, tiny_config
from gguf_files import dequantized, tiny_vocab, write_gguf
from gemmakit.config import GLOBAL, LOCAL
from gemmakit.gguf import load_gguf, read_gguf_header
from gemmakit.hub import model_from_state

VOCAB = 300  # room for the 256 byte pieces of the tiny vocabulary


def _model(generation: int, **changes):
    return random_model(tiny_config(generation).replace(vocab_size=VOCAB, **changes), seed=generation)


def _meta(config) -> dict:
    """Metadata llama.cpp does not derive from depth alone: the query scale and the local/global period."""
    meta = {}
    if config.query_pre_attn_scalar is not None:
        meta[f"{('', 'gemma', 'gemma2', 'gemma3')[config.generation]}.attention.scale"] = \
            float(config.query_pre_attn_scalar) ** -0.5
    if config.generation == 3:
        meta["gemma3.attention.sliding_window_pattern"] = 3  # tiny_config: local, local, global
    return meta


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_round_trip_f32_config_norms_and_logits(tmp_path, generation):
    model = _model(generation)
    path = write_gguf(tmp_path / "m.gguf", model, tiny_vocab(VOCAB), extra_meta=_meta(model.config))
    config, state, vocab = load_gguf(path, progress=False)
    assert config == model.config.replace(name="m.gguf")
    assert vocab.tokens == tiny_vocab(VOCAB).tokens
    for key, want in model.state_dict().items():
        got = state[key]
        assert got.shape == want.shape, key  # GGUF dims are stored reversed; we must give HF's [out, in]
        if "norm" in key:
            # Stored as 1 + w: exactly (w + 1) - 1 in fp32, i.e. w up to one rounding of the addition.
            torch.testing.assert_close(got, (want + 1.0) - 1.0, rtol=0, atol=0)
            assert not torch.allclose(got, want + 1.0)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    loaded = model_from_state(config, state)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-5, atol=1e-5)


# Types the gguf package can quantize: compare with its reference dequantizer (exact) and with the
# original weights (the quantization error bound of each format).
QUANTIZABLE = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q5_0: 8e-2, Q.Q5_1: 8e-2, Q.Q4_0: 0.16, Q.Q4_1: 0.16}


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_quantized_types(tmp_path, qtype):
    model = _model(3)
    path = write_gguf(tmp_path / "q.gguf", model, tiny_vocab(VOCAB), default_qtype=qtype,
                      extra_meta=_meta(model.config))
    _, state, _ = load_gguf(path, progress=False)
    for key, want in model.state_dict().items():
        if want.ndim == 1:
            continue
        ref = dequantized(want.numpy(), qtype)
        torch.testing.assert_close(state[key], ref, rtol=0, atol=0, msg=f"{key} {qtype.name}")
        err = (state[key] - want).abs().max() / want.abs().max()
        assert err < QUANTIZABLE[qtype], (key, qtype.name, float(err))


# -- K-quants: the gguf package dequantizes them but cannot quantize. Random blocks (any bit pattern is a
# valid block once the fp16 scales are finite) are checked against a line-by-line port of ggml's C
# reference (dequantize_row_q*_K in ggml-quants.c).

def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(q[j] & 63), int(q[j + 4] & 63)
    return int((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)), int((q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _ref_q4_k(block: np.ndarray) -> np.ndarray:
    d, dmin = block[:4].view(np.float16).astype(np.float32)
    scales, qs = block[4:16], block[16:144]
    y = []
    for j in range(4):
        sc1, m1 = _scale_min_k4(2 * j, scales)
        sc2, m2 = _scale_min_k4(2 * j + 1, scales)
        q = qs[32 * j:32 * j + 32].astype(np.float32)
        y += [d * np.float32(sc1) * (q.astype(np.uint8) & 0xF) - dmin * np.float32(m1),
              d * np.float32(sc2) * (q.astype(np.uint8) >> 4) - dmin * np.float32(m2)]
    return np.concatenate(y).astype(np.float32)


def _ref_q5_k(block: np.ndarray) -> np.ndarray:
    d, dmin = block[:4].view(np.float16).astype(np.float32)
    scales, qh, ql = block[4:16], block[16:48], block[48:176]
    y, u1, u2 = [], 1, 2
    for j in range(4):
        sc1, m1 = _scale_min_k4(2 * j, scales)
        sc2, m2 = _scale_min_k4(2 * j + 1, scales)
        lo = ql[32 * j:32 * j + 32]
        y += [d * np.float32(sc1) * ((lo & 0xF) + np.where(qh & u1, 16, 0)) - dmin * np.float32(m1),
              d * np.float32(sc2) * ((lo >> 4) + np.where(qh & u2, 16, 0)) - dmin * np.float32(m2)]
        u1, u2 = u1 << 2, u2 << 2
    return np.concatenate(y).astype(np.float32)


def _ref_q6_k(block: np.ndarray) -> np.ndarray:
    ql, qh, sc = block[:128], block[128:192], block[192:208].view(np.int8)
    d = block[208:210].view(np.float16).astype(np.float32)[0]
    y = np.zeros(256, np.float32)
    for n in range(2):
        L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for l in range(32):
            i = l // 16
            q1 = int((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = int((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = int((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = int((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            for off, s, q in ((0, S[i], q1), (32, S[i + 2], q2), (64, S[i + 4], q3), (96, S[i + 6], q4)):
                y[128 * n + l + off] = d * np.float32(s) * np.float32(q)
    return y


def _random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = (slice(0, 4),) if qtype != Q.Q6_K else (slice(208, 210),)
    for h in halves:  # finite, moderate fp16 scales
        raw[:, :, h] = rng.uniform(0.001, 0.01, raw[:, :, h].shape[:-1] + (raw[:, :, h].shape[-1] // 2,)) \
            .astype(np.float16).view(np.uint8).reshape(raw[:, :, h].shape)
    return raw.reshape(rows, -1)


K_REFS = {Q.Q4_K: _ref_q4_k, Q.Q5_K: _ref_q5_k, Q.Q6_K: _ref_q6_k}


@pytest.mark.parametrize("qtype", list(K_REFS), ids=lambda q: q.name)
def test_k_quants_against_ggml_reference(tmp_path, qtype):
    # Rows of 256 (one super-block) need d_model = 256; a non-square matrix checks orientation.
    model = _model(3, d_model=256, intermediate_size=512, head_dim=64)
    rng = np.random.default_rng(0)
    path = tmp_path / "k.gguf"
    write_gguf(path, model, tiny_vocab(VOCAB), extra_meta=_meta(model.config))
    # Rewrite: the same file, but gate_proj of layer 0 ([512, 256]) as random K-quant blocks.
    raw = _random_blocks(qtype, 512, 256, rng)
    path2 = tmp_path / "k2.gguf"
    _rewrite_with(path, path2, "blk.0.ffn_gate.weight", raw, qtype)
    _, state, _ = load_gguf(path2, progress=False)
    block = GGML_QUANT_SIZES[qtype][1]
    want = np.stack([np.concatenate([K_REFS[qtype](r[i:i + block]) for i in range(0, r.size, block)]) for r in raw])
    got = state["model.layers.0.mlp.gate_proj.weight"]
    assert got.shape == (512, 256)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-6, atol=1e-7)


def _rewrite_with(src, dst, name: str, raw: np.ndarray, qtype: Q) -> None:
    """Copy a GGUF, replacing one tensor's data by raw quantized bytes of `qtype`."""
    from gemmakit.gguf import open_gguf

    r = open_gguf(src)
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value, vtype = f.contents(), f.types[0]
        if f.types[0].name == "ARRAY":
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name == name:
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_type_the_package_cannot_dequantize_is_named(tmp_path):
    model = _model(3, d_model=256, intermediate_size=512, head_dim=64)
    write_gguf(tmp_path / "a.gguf", model, tiny_vocab(VOCAB), extra_meta=_meta(model.config))
    raw = np.zeros((512, 256 // 256 * GGML_QUANT_SIZES[Q.Q8_K][1]), np.uint8)
    _rewrite_with(tmp_path / "a.gguf", tmp_path / "b.gguf", "blk.0.ffn_up.weight", raw, Q.Q8_K)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*Q8_K"):
        load_gguf(tmp_path / "b.gguf", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("generation", [2, 3])
def test_logits_match_transformers_loading_the_same_gguf(tmp_path, generation):
    transformers = pytest.importorskip("transformers")
    # A depth with the published local/global period (gemma3: 6 layers, the last global) and the
    # default query scale, since transformers reads neither from GGUF metadata.
    changes = dict(n_layers=6, layer_types=(LOCAL,) * 5 + (GLOBAL,), head_dim=256, query_pre_attn_scalar=256.0)
    if generation == 3:
        changes["rope_scale_global"] = 1.0
    else:
        changes["layer_types"] = (LOCAL, GLOBAL) * 3
    model = _model(generation, **changes)
    write_gguf(tmp_path / "m.gguf", model, tiny_vocab(VOCAB), default_qtype=Q.Q8_0)
    config, state, _ = load_gguf(tmp_path / "m.gguf", progress=False)
    assert config.layer_types == model.config.layer_types
    ours = model_from_state(config, state)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                            dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, rtol=1e-4, atol=1e-4)


# -- bad files ------------------------------------------------------------------------------------

@pytest.fixture
def good_gguf(tmp_path):
    model = _model(3)
    return write_gguf(tmp_path / "good.gguf", model, tiny_vocab(VOCAB), extra_meta=_meta(model.config))


def test_header_fields_equal_the_gguf_packages_reader(good_gguf):
    """gemmakit's reader parses arrays in one piece (the vocabulary's 262k strings were most of a GGUF's
    start-up); every field's contents, types and the tensors equal the gguf package's own reader."""
    from gguf import GGUFReader

    from gemmakit.gguf import open_gguf

    ours, theirs = open_gguf(good_gguf), GGUFReader(good_gguf)
    assert ours.fields.keys() == theirs.fields.keys()
    for key, f in theirs.fields.items():
        assert ours.fields[key].contents() == f.contents(), key
        assert ours.fields[key].types[0] == f.types[0], key
    assert len(ours.fields["tokenizer.ggml.tokens"].contents()) == VOCAB  # strings, scores, types: all read
    assert isinstance(ours.fields["tokenizer.ggml.scores"].contents()[0], float)
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in theirs.tensors]


def test_truncated_file(tmp_path, good_gguf):
    data = good_gguf.read_bytes()
    for cut, what in ((len(data) // 2, "truncated"), (200, "corrupt or truncated")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=what) as e:
            load_gguf(bad, progress=False)
        assert str(bad) in str(e.value)


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(bad, progress=False)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", _model(3), tiny_vocab(VOCAB), arch="llama")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'llama'"):
        read_gguf_header(path)


def test_missing_and_unexpected_tensors(tmp_path):
    model = _model(3)
    path = write_gguf(tmp_path / "m.gguf", model, tiny_vocab(VOCAB), drop=("blk.1.ffn_up.weight",),
                      extra_meta=_meta(model.config))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(path, progress=False)
    # A Gemma 1 reading of a Gemma 3 file has no place for the QK-norm weights.
    path = write_gguf(tmp_path / "x.gguf", model, tiny_vocab(VOCAB), arch="gemma", extra_meta=_meta(model.config))
    with pytest.raises(ValueError, match=r"unexpected tensor blk\.0\.(attn_q_norm|attn_k_norm|post_attention_norm)"):
        load_gguf(path, progress=False)
