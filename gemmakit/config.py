"""Model sizes as data: one frozen Config, the published presets, and readers for HF config.json.

Imports nothing from gemmakit; everything else imports this.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

LOCAL, GLOBAL = "local", "global"


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower plus Gemma 3's multimodal projector."""

    image_size: int = 896  # square input side, pixels
    patch_size: int = 14  # ViT patch side; 896/14 = 64 patches per side
    hidden_size: int = 1152  # SigLIP width
    n_layers: int = 27  # encoder layers
    n_heads: int = 16  # attention heads (head_dim = hidden_size / n_heads = 72)
    intermediate_size: int = 4304  # SigLIP MLP width
    norm_eps: float = 1e-6  # LayerNorm eps inside the tower
    tokens_per_image: int = 256  # soft tokens after average pooling (16 x 16)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class Config:
    """One Gemma text decoder. Every generation is a point in this space."""

    name: str  # preset name, or where the config came from
    generation: int  # 1, 2 or 3: only for display and defaults, never branched on in the model
    vocab_size: int  # rows of the tied embedding / LM head
    d_model: int  # residual stream width (HF hidden_size)
    n_layers: int  # decoder blocks
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads: 1 = MQA, n_heads = MHA, otherwise GQA
    head_dim: int  # width of one head (not always d_model / n_heads)
    intermediate_size: int  # GeGLU width of each of gate and up
    layer_types: tuple[str, ...]  # LOCAL (sliding window) or GLOBAL, one per layer
    max_seq_len: int  # context length the model was trained for
    sliding_window: int | None = None  # W for LOCAL layers: key k visible from q iff q - W < k <= q
    query_pre_attn_scalar: float | None = None  # scores are scaled by this ** -0.5; None = head_dim
    attn_softcap: float | None = None  # cap * tanh(scores / cap) before the mask (Gemma 2: 50)
    final_softcap: float | None = None  # same on the output logits (Gemma 2: 30)
    post_norms: bool = False  # RMSNorm after attention and after the MLP too (Gemma 2/3)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Gemma 3)
    rope_base_global: float = 10_000.0  # RoPE theta on GLOBAL layers
    rope_base_local: float = 10_000.0  # RoPE theta on LOCAL layers
    rope_scale_global: float = 1.0  # linear RoPE scaling factor on GLOBAL layers (positions / factor)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    vision: VisionConfig | None = None  # Gemma 3 4B+ vision tower; None for text-only models
    image_token_id: int | None = None  # placeholder id the soft image tokens take in the prompt

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"{self.name}: {len(self.layer_types)} layer_types for {self.n_layers} layers")
        if bad := set(self.layer_types) - {LOCAL, GLOBAL}:
            raise ValueError(f"{self.name}: unknown layer types {sorted(bad)}")
        if LOCAL in self.layer_types and not self.sliding_window:
            raise ValueError(f"{self.name}: local layers need a sliding_window")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: {self.n_heads} heads not divisible by {self.n_kv_heads} kv heads")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_scale(self) -> float:
        # Cast to the compute dtype by the model before use: sqrt(3072) is 55.5 in bf16, not 55.43.
        return math.sqrt(self.d_model)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    # -- parameter counts (closed form, checked against the meta-device model in tests) --

    def param_counts(self) -> dict[str, int]:
        """Embedding, non-embedding and vision parameters of the model as built."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + (2 * hd if self.qk_norm else 0)
        mlp = 3 * d * self.intermediate_size
        norms = d * (4 if self.post_norms else 2)
        counts = {
            "embedding": self.vocab_size * d,
            "non_embedding": self.n_layers * (attn + mlp + norms) + d,
        }
        if self.vision is not None:
            v = self.vision
            h = v.hidden_size
            n_pos = v.patches_per_side**2
            layer = 4 * (h * h + h) + 2 * h * v.intermediate_size + v.intermediate_size + h + 4 * h
            counts["vision"] = 3 * v.patch_size**2 * h + h + n_pos * h + v.n_layers * layer + 2 * h
            counts["projector"] = h + h * d
        return counts


def layer_pattern(n_layers: int, period: int) -> tuple[str, ...]:
    """Every `period`-th layer is global, the others local (Gemma 2: period 2, Gemma 3: period 6)."""
    return tuple(GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(n_layers))


def _gemma1(name: str, **kw: Any) -> Config:
    n = kw["n_layers"]
    return Config(name=name, generation=1, vocab_size=256128, layer_types=(GLOBAL,) * n,
                  max_seq_len=8192, head_dim=256, **kw)


def _gemma2(name: str, **kw: Any) -> Config:
    kw.setdefault("head_dim", 256)
    kw.setdefault("query_pre_attn_scalar", 256)
    # 256128 rows as in the report (its Table 2 embedding counts are 256128 x d_model); the HF
    # checkpoints drop the 128 unused rows (vocab_size 256000), exactly as for Gemma 1.
    return Config(name=name, generation=2, vocab_size=256128, layer_types=layer_pattern(kw["n_layers"], 2),
                  max_seq_len=8192, sliding_window=4096, attn_softcap=50.0, final_softcap=30.0,
                  post_norms=True, **kw)


def _gemma3(name: str, **kw: Any) -> Config:
    long = kw.pop("long_context")
    kw.setdefault("head_dim", 256)
    kw.setdefault("query_pre_attn_scalar", 256)
    return Config(name=name, generation=3, vocab_size=262144, layer_types=layer_pattern(kw["n_layers"], 6),
                  max_seq_len=131072 if long else 32768, sliding_window=1024 if long else 512,
                  post_norms=True, qk_norm=True, rope_base_global=1_000_000.0,
                  rope_scale_global=8.0 if long else 1.0, vision=VisionConfig() if long else None,
                  image_token_id=262144 if long else None, **kw)


# Sizes from the reports, checked against the official code (see tests/test_config.py for the counts).
CONFIGS: dict[str, Config] = {c.name: c for c in [
    _gemma1("gemma-2b", d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1, intermediate_size=16384),
    _gemma1("gemma-7b", d_model=3072, n_layers=28, n_heads=16, n_kv_heads=16, intermediate_size=24576),
    _gemma2("gemma2-2b", d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, intermediate_size=9216),
    _gemma2("gemma2-9b", d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, intermediate_size=14336),
    _gemma2("gemma2-27b", d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128,
            intermediate_size=36864, query_pre_attn_scalar=144),
    _gemma3("gemma3-270m", d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, intermediate_size=2048,
            long_context=False),
    _gemma3("gemma3-1b", d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, intermediate_size=6912,
            long_context=False),
    _gemma3("gemma3-4b", d_model=2560, n_layers=34, n_heads=8, n_kv_heads=4, intermediate_size=10240,
            long_context=True),
    _gemma3("gemma3-12b", d_model=3840, n_layers=48, n_heads=16, n_kv_heads=8, intermediate_size=15360,
            long_context=True),
    _gemma3("gemma3-27b", d_model=5376, n_layers=62, n_heads=32, n_kv_heads=16, head_dim=128,
            intermediate_size=21504, query_pre_attn_scalar=168, long_context=True),
]}


def get_config(name: str) -> Config:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; known presets: {', '.join(CONFIGS)}") from None


# -- transformers config.json ------------------------------------------------------------------

# What transformers assumes for a field left out of config.json, per model type.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, rope_theta=10_000.0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None, sliding_window_pattern=6),
}
_HF_VISION_DEFAULTS = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072, layer_norm_eps=1e-6)
_GELU_TANH = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast"}
_HF_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}


def _rope(params: dict | None, fallback_theta: float, where: str) -> tuple[float, float]:
    """(theta, linear factor) of one HF rope parameter block."""
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"unsupported RoPE type {kind!r} in {where}")
    factor = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
    return float(params.get("rope_theta", fallback_theta)), factor


def from_hf(hf: dict[str, Any], name: str = "hf") -> Config:
    """Config from a transformers config.json (gemma, gemma2, gemma3_text, gemma3), either form.

    Accepts Google's published transformers-4 form (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern) and the transformers-5 form (rope_parameters per layer type, layer_types).
    """
    model_type = hf.get("model_type")
    vision = image_token_id = None
    if model_type == "gemma3":
        if "vision_config" in hf:
            v = {**_HF_VISION_DEFAULTS, **hf["vision_config"]}
            if v.get("hidden_act", "gelu_pytorch_tanh") not in _GELU_TANH:
                raise ValueError(f"unsupported vision activation {v['hidden_act']!r}; Gemma 3's SigLIP uses tanh GELU")
            if v.get("vision_use_head"):
                raise ValueError("vision_use_head=true: Gemma 3's vision tower has no pooling head")
            tokens = int(hf.get("mm_tokens_per_image", 256))
            vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"],
                                  hidden_size=v["hidden_size"], n_layers=v["num_hidden_layers"],
                                  n_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                                  norm_eps=v["layer_norm_eps"], tokens_per_image=tokens)
            image_token_id = int(hf.get("image_token_index", hf.get("image_token_id", 262144)))
        hf = {"model_type": "gemma3_text", **hf.get("text_config", {})}
        model_type = "gemma3_text"
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"unsupported model_type {model_type!r}; gemmakit reads gemma, gemma2, gemma3_text, gemma3")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true (an encoder variant) is not a Gemma decoder")
    c = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k.endswith("capping")}}
    generation = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[model_type]

    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    # Gemma 1 configs were published with hidden_act="gelu", but the model was trained with the tanh
    # approximation (as the official code and transformers run it); anything else is a different model.
    if act not in _GELU_TANH and not (act == "gelu" and generation == 1):
        raise ValueError(f"unsupported activation {act!r}; Gemma uses tanh-approximated GELU")

    n = int(c["num_hidden_layers"])
    if "layer_types" in c:
        try:
            layer_types = tuple(_HF_LAYER_TYPES[t] for t in c["layer_types"])
        except KeyError as e:
            raise ValueError(f"unknown layer type {e.args[0]!r} in config.json") from None
    elif generation == 1:
        layer_types = (GLOBAL,) * n
    elif generation == 2:
        layer_types = layer_pattern(n, 2)
    else:
        layer_types = layer_pattern(n, int(c["sliding_window_pattern"]))

    rp = c.get("rope_parameters")
    if rp and ("full_attention" in rp or "sliding_attention" in rp):  # transformers 5, per layer type
        base_g, scale_g = _rope(rp.get("full_attention"), c["rope_theta"], "rope_parameters.full_attention")
        base_l, scale_l = _rope(rp.get("sliding_attention"), c.get("rope_local_base_freq", base_g),
                                "rope_parameters.sliding_attention")
    else:  # transformers 4: one theta (+ rope_scaling on global layers), Gemma 3 adds a local theta
        base_g, scale_g = _rope({**(rp or {}), **(c.get("rope_scaling") or {})}, c["rope_theta"], "rope_scaling")
        base_l, scale_l = c.get("rope_local_base_freq", base_g), 1.0
        if generation < 3:
            base_l = base_g
    if scale_l != 1.0:
        raise ValueError("RoPE scaling on sliding-window layers is not part of any Gemma")

    return Config(
        name=name, generation=generation, vocab_size=int(c["vocab_size"]), d_model=int(c["hidden_size"]),
        n_layers=n, n_heads=int(c["num_attention_heads"]), n_kv_heads=int(c["num_key_value_heads"]),
        head_dim=int(c["head_dim"]), intermediate_size=int(c["intermediate_size"]), layer_types=layer_types,
        max_seq_len=int(c["max_position_embeddings"]),
        sliding_window=int(c["sliding_window"]) if LOCAL in layer_types else None,
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]) if generation > 1 else None,
        attn_softcap=c.get("attn_logit_softcapping"), final_softcap=c.get("final_logit_softcapping"),
        post_norms=generation > 1, qk_norm=generation > 2, rope_base_global=base_g, rope_base_local=base_l,
        rope_scale_global=scale_g, norm_eps=float(c["rms_norm_eps"]), vision=vision, image_token_id=image_token_id,
    )


def to_hf(config: Config) -> dict[str, Any]:
    """A transformers-5 style config.json for `config` (what `from_hf` reads back unchanged)."""
    text: dict[str, Any] = dict(
        model_type={1: "gemma", 2: "gemma2", 3: "gemma3_text"}[config.generation],
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    if config.generation == 1:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_base_global}
    else:
        full = {"rope_type": "default", "rope_theta": config.rope_base_global}
        if config.rope_scale_global != 1.0:
            full = {"rope_type": "linear", "factor": config.rope_scale_global, "rope_theta": config.rope_base_global}
        text.update(
            layer_types=["sliding_attention" if t == LOCAL else "full_attention" for t in config.layer_types],
            sliding_window=config.sliding_window,
            # transformers 5 validates this field as an int (a float such as 256.0 is rejected).
            query_pre_attn_scalar=int(q) if (q := config.query_pre_attn_scalar or config.head_dim) % 1 == 0 else q,
            attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap,
        )
        if config.generation == 2:
            if config.rope_base_local != config.rope_base_global:
                raise ValueError("Gemma 2 has one RoPE base for all layers")
            text["rope_parameters"] = full
        else:
            text["rope_parameters"] = {"full_attention": full,
                                       "sliding_attention": {"rope_type": "default",
                                                             "rope_theta": config.rope_base_local}}
    arch = {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}[config.generation]
    if config.vision is None:
        return {"architectures": [arch], **text}
    v = config.vision
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
        "vision_config": dict(model_type="siglip_vision_model", image_size=v.image_size, patch_size=v.patch_size,
                              hidden_size=v.hidden_size, num_hidden_layers=v.n_layers,
                              num_attention_heads=v.n_heads, intermediate_size=v.intermediate_size,
                              layer_norm_eps=v.norm_eps, vision_use_head=False),
        "mm_tokens_per_image": v.tokens_per_image, "image_token_index": config.image_token_id,
        "boi_token_index": 255999, "eoi_token_index": 256000, "tie_word_embeddings": True,
    }
