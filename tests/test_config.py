"""Presets against the reports: parameters counted on the meta-device model, per-layer patterns, the
published values; from_hf on config.json as Google published it and as transformers 5 writes it."""

import json

import pytest

from gemmakit.cli import main
from gemmakit.config import CONFIGS, GLOBAL, LOCAL, from_hf, get_config, to_hf
from gemmakit.model import build

# (embedding, non-embedding) as the reports print them: Gemma and Gemma 2 Table 2 (vocab 256128),
# Gemma 3 Table 1 non-embedding (exact values from the issue; the embedding is 262,144 x d_model, the
# table's 302M for 1B) and the Gemma 3 270M model card.
PAPER = {
    "gemma-2b": (524_550_144, 1_981_884_416),
    "gemma-7b": (786_825_216, 7_751_248_896),
    "gemma2-2b": (590_118_912, 2_024_517_888),
    "gemma2-9b": (917_962_752, 8_324_201_984),
    "gemma2-27b": (1_180_237_824, 26_047_480_320),
    "gemma3-270m": (167_772_160, 100_326_016),
    "gemma3-1b": (301_989_888, 697_896_064),
    "gemma3-4b": (671_088_640, 3_209_010_688),
    "gemma3-12b": (1_006_632_960, 10_759_155_456),
    "gemma3-27b": (1_409_286_144, 25_599_716_096),
}


def test_every_preset_is_covered():
    assert set(CONFIGS) == set(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_parameter_counts_of_the_built_model(name):
    config = get_config(name)
    # Text decoder only: the vision tower of 4B+ is counted by the vision tests.
    model = build(config.replace(vision=None, image_token_id=None), "meta")
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    embedding = params.pop("model.embed_tokens.weight").numel()
    non_embedding = sum(p.numel() for p in params.values())
    assert (embedding, non_embedding) == PAPER[name]
    counts = config.param_counts()
    assert (counts["embedding"], counts["non_embedding"]) == PAPER[name]


def test_paper_rounding_of_gemma3():
    # Table 1 prints millions: 1B 698M, 4B 3,209M, 12B 10,759M, 27B 25,600M; the 270M card ~170M + ~100M.
    rounded = {n: round(PAPER[n][1] / 1e6) for n in ("gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b")}
    assert rounded == {"gemma3-1b": 698, "gemma3-4b": 3209, "gemma3-12b": 10759, "gemma3-27b": 25600}


def generation(g):
    return [c for c in CONFIGS.values() if c.generation == g]


def test_layer_patterns():
    for c in generation(1):
        assert c.layer_types == (GLOBAL,) * c.n_layers
    for c in generation(2):  # alternating, local first
        assert c.layer_types[:4] == (LOCAL, GLOBAL, LOCAL, GLOBAL)
        assert all(t == (GLOBAL if i % 2 else LOCAL) for i, t in enumerate(c.layer_types))
    for c in generation(3):  # five local, then one global
        assert c.layer_types[:6] == (LOCAL,) * 5 + (GLOBAL,)
        assert all(t == (GLOBAL if (i + 1) % 6 == 0 else LOCAL) for i, t in enumerate(c.layer_types))
    assert get_config("gemma3-1b").layer_types.count(GLOBAL) == 4  # 26 layers: globals at 6, 12, 18, 24
    assert get_config("gemma3-27b").layer_types[-2:] == (LOCAL, LOCAL)  # 62 layers: last global is layer 60


def test_published_values():
    qpas = {c.name: c.query_pre_attn_scalar for c in CONFIGS.values() if c.generation > 1}
    assert qpas.pop("gemma2-27b") == 144 and qpas.pop("gemma3-27b") == 168
    assert all(v == 256 for v in qpas.values())  # head_dim of the others
    assert get_config("gemma2-27b").attn_scale == 144**-0.5 and get_config("gemma3-27b").attn_scale == 168**-0.5
    assert get_config("gemma-7b").attn_scale == 256**-0.5

    window = {c.name: c.sliding_window for c in CONFIGS.values()}
    assert window == {"gemma-2b": None, "gemma-7b": None, "gemma2-2b": 4096, "gemma2-9b": 4096, "gemma2-27b": 4096,
                      "gemma3-270m": 512, "gemma3-1b": 512, "gemma3-4b": 1024, "gemma3-12b": 1024, "gemma3-27b": 1024}
    context = {c.name: c.max_seq_len for c in CONFIGS.values()}
    assert context == {"gemma-2b": 8192, "gemma-7b": 8192, "gemma2-2b": 8192, "gemma2-9b": 8192, "gemma2-27b": 8192,
                       "gemma3-270m": 32768, "gemma3-1b": 32768, "gemma3-4b": 131072, "gemma3-12b": 131072,
                       "gemma3-27b": 131072}
    scaled = {c.name for c in CONFIGS.values() if c.rope_scale_global != 1.0}
    assert scaled == {"gemma3-4b", "gemma3-12b", "gemma3-27b"}
    assert all(c.rope_scale_global == 8.0 for c in CONFIGS.values() if c.name in scaled)
    for c in CONFIGS.values():
        assert c.rope_base_local == 10_000.0
        assert c.rope_base_global == (1_000_000.0 if c.generation == 3 else 10_000.0)
        assert (c.attn_softcap, c.final_softcap) == ((50.0, 30.0) if c.generation == 2 else (None, None))
        assert c.post_norms == (c.generation > 1) and c.qk_norm == (c.generation == 3)
        assert c.norm_eps == 1e-6


def test_gemma1_blocks_have_no_post_norms():
    names = {n for n, _ in build(get_config("gemma-2b"), "meta").named_parameters()}
    assert "model.layers.0.post_attention_layernorm.weight" in names  # HF's name for Gemma 1's pre-MLP norm
    assert not any("feedforward_layernorm" in n or "q_norm" in n for n in names)
    names3 = {n for n, _ in build(get_config("gemma3-1b"), "meta").named_parameters()}
    assert {"model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= names3


# -- config.json, as Google published it (transformers 4.x; fields left out where the default applies) --

GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0",
    "use_cache": True, "vocab_size": 256000,
}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 16,
    "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "sliding_window_size": 4096,
    "torch_dtype": "float32", "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 256000,
}
GEMMA3_1B_PT = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
GEMMA3_4B_IT = {  # the multimodal wrapper; its text_config only lists what differs from the defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}
GEMMA3_270M = {  # published with transformers 4.55: layer_types already present, rope still in the old names
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
    "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 512, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144,
}


def transformers5_form(name):
    """The same checkpoint's config as transformers 5 writes it (rope_parameters per layer type, layer_types)."""
    t = pytest.importorskip("transformers")
    if name == "gemma-2b":
        c = t.GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                          num_attention_heads=8, num_key_value_heads=1, head_dim=256)
    elif name == "gemma2-9b":
        c = t.Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                           num_key_value_heads=8)
    elif name == "gemma3-4b":
        text = t.Gemma3TextConfig(
            hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        c = t.Gemma3Config(text_config=text.to_dict(), vision_config=dict(
            hidden_size=1152, image_size=896, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
            patch_size=14, vision_use_head=False))
    else:
        n_layers, d, ffn = {"gemma3-1b": (26, 1152, 6912), "gemma3-270m": (18, 640, 2048)}[name]
        c = t.Gemma3TextConfig(vocab_size=262144, hidden_size=d, intermediate_size=ffn, num_hidden_layers=n_layers,
                               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32768,
                               sliding_window=512)
    out = json.loads(c.to_json_string())
    assert "rope_parameters" in out.get("text_config", out)  # really the transformers-5 form
    return out


PUBLISHED = [  # (config.json, preset, vocab of that checkpoint)
    (GEMMA_2B, "gemma-2b", 256000),  # the HF checkpoints drop the report's 128 unused rows
    (GEMMA2_9B, "gemma2-9b", 256000),  # likewise
    (GEMMA3_1B_PT, "gemma3-1b", 262144),
    (GEMMA3_4B_IT, "gemma3-4b", 262208),  # multimodal checkpoints carry 64 extra rows (image token at 262144)
    (GEMMA3_270M, "gemma3-270m", 262144),
]


@pytest.mark.parametrize("hf, preset, vocab", PUBLISHED, ids=[p for _, p, _ in PUBLISHED])
def test_from_hf_both_forms_give_the_preset(hf, preset, vocab):
    expected = get_config(preset).replace(name="x", vocab_size=vocab)
    assert from_hf(json.loads(json.dumps(hf)), name="x") == expected
    assert from_hf(transformers5_form(preset), name="x") == expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_hf_round_trip(name):
    c = get_config(name)
    assert from_hf(json.loads(json.dumps(to_hf(c))), name=name) == c


@pytest.mark.parametrize("name", ["gemma-2b", "gemma2-27b", "gemma3-270m", "gemma3-27b"])
def test_transformers_reads_to_hf(name):
    t = pytest.importorskip("transformers")
    c = get_config(name)
    hf = t.AutoConfig.for_model(**to_hf(c))
    text = hf.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (c.d_model, c.n_layers, c.n_kv_heads)
    assert from_hf(json.loads(hf.to_json_string()), name=name) == c


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        from_hf({"model_type": "llama", "hidden_size": 64})
    with pytest.raises(ValueError, match="unsupported model_type None"):
        from_hf({"hidden_size": 64})
    with pytest.raises(ValueError, match="unknown model name 'gemma4-1b'.*gemma3-270m"):
        get_config("gemma4-1b")
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        from_hf({**GEMMA3_1B_PT, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="unsupported activation 'silu'"):
        from_hf({**GEMMA2_9B, "hidden_activation": "silu"})
    with pytest.raises(ValueError, match="unknown layer type 'chunked_attention'"):
        from_hf({**GEMMA3_270M, "layer_types": ["chunked_attention"] * 18})


def test_cli_info(capsys):
    assert main(["info", "gemma3-270m"]) == 0
    out = capsys.readouterr().out
    assert "167,772,160" in out and "100,326,016" in out and "LLLLLGLLLLLGLLLLLG" in out
    assert main(["info", "gemma4-1b"]) == 1
    err = capsys.readouterr().err
    assert "gemma4-1b" in err and "gemma3-270m" in err and len(err.splitlines()) == 1  # names it, lists presets
