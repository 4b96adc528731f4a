"""Parity with transformers: one shared runner applies the same checks to a tiny random model of each
generation, saved with `save_pretrained` and loaded with gemmakit.weights.load."""

import json

import pytest
import torch

from gemmakit import weights
from gemmakit.cache import make_cache

transformers = pytest.importorskip("transformers")

B, T, WINDOW, PREFILL = 2, 13, 5, 7  # the sequence is longer than the window; so is the prefill
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=24, max_position_embeddings=64)
# Gemma 3's tiny config: local, local, global, local (the transformers-4 form writes it as pattern 3).
G3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def hf_models():
    """(transformers model class, its config): every feature of the generation switched on."""
    return {
        1: (transformers.GemmaForCausalLM, transformers.GemmaConfig(**COMMON, num_hidden_layers=2)),
        # Caps far below the published 50/30 so that they bend these small random scores and logits.
        2: (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **COMMON, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=18,
            attn_logit_softcapping=1.5, final_logit_softcapping=2.0)),
        3: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **COMMON, num_hidden_layers=4, layer_types=G3_LAYERS, sliding_window=WINDOW, query_pre_attn_scalar=18,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    }


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda g: f"gemma{g}")
def case(request, tmp_path_factory):
    """(generation, HF model, checkpoint dir, tokens, reference logits)."""
    cls, config = hf_models()[request.param]
    torch.manual_seed(request.param)
    hf = cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # transformers zero-initializes them ((1 + w) = 1), which would hide bugs
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    out = tmp_path_factory.mktemp(f"gemma{request.param}")
    hf.save_pretrained(out)
    tokens = torch.randint(0, COMMON["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    return request.param, hf, out, tokens, ref


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_config_read_from_checkpoint(case):
    generation, hf, out, _, _ = case
    c = weights.load_config(out)
    assert c.generation == generation and c.n_kv_heads == 2 and c.n_heads == 4
    if generation > 1:
        assert c.sliding_window == WINDOW < T and "local" in c.layer_types and "global" in c.layer_types
    if generation == 3:
        assert c.layer_types == ("local", "local", "global", "local") and c.rope_scale_global == 8.0


def test_logits_match_transformers(case):
    generation, _, out, tokens, ref = case
    model = weights.load(out)
    with torch.no_grad():
        logits = model(tokens)
    print(f"gemma{generation} fp32 max |logits - transformers| = {max_diff(logits, ref):.3g}")
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_cached_decode_matches_full_forward(case):
    generation, _, out, tokens, ref = case
    model = weights.load(out)
    cache = make_cache(model.config, B, T)
    with torch.no_grad():
        steps = [model(tokens[:, :PREFILL], cache=cache)]
        steps += [model(tokens[:, i:i + 1], cache=cache) for i in range(PREFILL, T)]
        full = model(tokens)
    cached = torch.cat(steps, dim=1)
    print(f"gemma{generation} fp32 max |cached - full| = {max_diff(cached, full):.3g}")
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, ref, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_transformers(case):
    """Row 0 left-padded by 4: gemmakit's positions -1 against transformers' attention_mask + position_ids."""
    generation, hf, out, tokens, _ = case
    pad = 4
    keep = torch.ones(B, T, dtype=torch.long)
    keep[0, :pad] = 0
    positions = (keep.cumsum(-1) - 1).masked_fill(keep == 0, -1)
    model = weights.load(out)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=keep, position_ids=positions.clamp(min=0)).logits
        logits = model(tokens, positions)
        alone = model(tokens[:1, pad:])
    real = keep.bool()  # transformers' outputs at padding positions are not defined
    print(f"gemma{generation} left-padded max |logits - transformers| = {max_diff(logits[real], ref[real]):.3g}")
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0, pad:], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [3], indirect=True, ids=["gemma3"])
def test_gemma3_transformers4_config_json(case):
    """The same Gemma 3 weights with config.json rewritten the way Google published Gemma 3 (transformers 4.x)."""
    _, hf, out, tokens, ref = case
    t4 = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": COMMON["vocab_size"],
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 24, "max_position_embeddings": 64,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 18, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": WINDOW, "sliding_window_pattern": 3,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "torch_dtype": "float32",
        "transformers_version": "4.50.0.dev0",
    }
    (out / "config.json").write_text(json.dumps(t4))
    try:
        model = weights.load(out)
    finally:
        hf.config.save_pretrained(out)  # restore the transformers-5 form for the other tests
    with torch.no_grad():
        logits = model(tokens)
    print(f"gemma3 (transformers-4 config.json) max |logits - transformers| = {max_diff(logits, ref):.3g}")
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
