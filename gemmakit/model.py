"""The Gemma 1/2/3 text decoder: one code path, config flags only where the generations differ.

Module attribute names equal the HF checkpoint keys (`model.layers.3.self_attn.q_proj.weight`), so a
checkpoint loads with a plain strict `load_state_dict`. The model does no I/O, tokenizing or sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.cache import KVCache
from gemmakit.config import GLOBAL, LOCAL, Config


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32. Weights are stored zero-centred."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize and scale in fp32, cast once at the end: (x * (1 + w)).to(bf16), not x.to(bf16) * w.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def materialize(x: Tensor) -> Tensor:
    """x stored to a buffer of its own before the products read it (compiled code only).

    inductor otherwise inlines whatever pointwise op produced x (an RMSNorm, say) into the product's
    loop, and recomputes it, reciprocal square root included, for every one of the output rows:
    the 262,144-row LM head then ran at half speed. Forcing a fixed stride order is inductor's way to
    make an input a real buffer; eagerly it is a no-op on a contiguous tensor.
    """
    import torch._inductor.inductor_prims  # noqa: F401  registers the op; inductor is loaded when compiling

    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


def rope_inv_freq(head_dim: int, base: float, scale: float = 1.0) -> Tensor:
    # Linear scaling divides the frequencies (as the reference does), not the positions: equal in
    # exact arithmetic, and this order reproduces its fp32 rounding.
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim)) / scale


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, T, head_dim] for positions [B, T], computed in fp32, used in `dtype`."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout: the two halves share frequencies
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x [B, H, T, D] (NeoX layout, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, q_segment: Tensor | None = None,
                   k_segment: Tensor | None = None, q_last: Tensor | None = None) -> Tensor:
    """Boolean [B, 1, T, S]: True where query may attend to key.

    Causal on absolute positions; with a window W, key k is visible from query q iff q - W < k <= q
    (the current token plus W - 1 before it). Keys at position -1 are empty slots or padding.
    Segments (packed documents) only see their own segment.
    q_last [B, T]: the last position each query may see, when that is past itself: an image's soft
    tokens see their whole image (bidirectional within it, causal before it). The window still
    counts back from the query's own position, as the reference does.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= (q if q_last is None else q_last[:, :, None]))
    if window is not None:
        mask &= k > q - window
    if q_segment is not None:
        mask &= q_segment[:, :, None] == k_segment[:, None, :]
    # A padding query (position -1) sees nothing; let it see everything instead so that softmax
    # stays finite (an all-masked row is NaN, and 0 * NaN would leak into real tokens' outputs).
    mask |= (q < 0)
    return mask[:, None]


def image_last_positions(image_mask: Tensor, positions: Tensor) -> Tensor:
    """For attention_mask's q_last: the position of the last token of each query's image run
    (a run of consecutive soft tokens is one image), or the query's own position for text."""
    nxt = F.pad(image_mask[:, 1:], (0, 1), value=False)
    ends = torch.where(image_mask & ~nxt, positions, torch.iinfo(positions.dtype).max)
    # Nearest run end at or after each token: a reversed running minimum.
    ends = ends.flip(-1).cummin(-1).values.flip(-1)
    return torch.where(image_mask, ends, positions)


class Attention(nn.Module):
    def __init__(self, config: Config, kind: str) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.scale, self.softcap = c.attn_scale, c.attn_softcap
        self.window = c.sliding_window if kind == LOCAL else None
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, cache: KVCache | None,
                segments: Tensor | None, last: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Gemma 3: QK-norm replaces soft-capping, applied before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        k_pos = pos
        if cache is not None:
            k, v, k_pos = cache.update(k, v, pos)
        mask = attention_mask(pos, k_pos, self.window, segments, segments if cache is None else None, last)
        rep = self.n_heads // self.n_kv_heads
        if self.softcap is None and t > 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=rep > 1)
        else:
            # Written out, as in the reference's eager attention. Gemma 2 needs it for the soft-cap; a
            # single query (decode) takes it too: for one query over 512 cached positions, the CPU's
            # flash-attention kernel costs about 0.3 ms per call in fp32 and 1.5 ms in bf16, several
            # times these two small products. Query heads are grouped by the key/value head they
            # share, so K and V are not repeated.
            s = k.shape[2]
            qg = q.reshape(b, self.n_kv_heads, rep * t, self.head_dim)
            # Compiled decode writes the two products as reductions that inductor generates itself: as
            # library calls they cost ~40 us each for one query over 512 slots, plus a copy of K per
            # call in bf16, about 3 ms of a 25 ms step. Their inputs get buffers of their own, or inductor
            # recomputes q's norm and RoPE for every slot, and the softmax for every output element.
            # Eagerly the broadcasts would be materialized, so only compiled code takes this path.
            reduce = t == 1 and torch.compiler.is_compiling()
            if reduce:
                scores = (materialize(qg.float())[:, :, :, None] * k[:, :, None].float()).sum(-1).to(q.dtype)
            else:
                scores = qg @ k.transpose(-2, -1)
            scores = scores.view(b, self.n_heads, t, s) * self.scale
            if self.softcap is not None:
                # Gemma 2 caps the scaled scores *before* the mask, so masked entries stay -inf.
                scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            probs = probs.view(b, self.n_kv_heads, rep * t, s)
            if reduce:
                out = (materialize(probs.float())[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype)
            else:
                out = probs @ v
            out = out.view(b, self.n_heads, t, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Config, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.self_attn = Attention(config, kind)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        # HF's name for the second norm: in Gemma 1 it is the norm *before* the MLP; in Gemma 2/3 it
        # is applied to the attention output, and two more norms wrap the MLP.
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.post_norms = config.post_norms
        if config.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(config.d_model, config.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, cache: KVCache | None,
                segments: Tensor | None, last: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, pos, cache, segments, last)
        if not self.post_norms:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Body(nn.Module):
    """HF's `model.*`: embedding, blocks, final norm."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_types)
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class Gemma(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config)
        if config.vision is not None:  # Gemma 3 4B+: SigLIP tower + projector, under their HF key names
            from gemmakit.vision import MultiModalProjector, VisionTower  # vision.py imports RMSNorm from here

            self.vision_tower = VisionTower(config.vision)
            self.multi_modal_projector = MultiModalProjector(config.vision, config.d_model)
        # Kept out of the module's buffers on purpose: model.to(bf16) must not round the frequencies.
        self.inv_freq = {GLOBAL: rope_inv_freq(config.head_dim, config.rope_base_global, config.rope_scale_global),
                         LOCAL: rope_inv_freq(config.head_dim, config.rope_base_local)}

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Every weight in one place: N(0, std) for matrices and the embedding, zeros for norms ((1+w) = 1)."""
        for name, p in self.named_parameters():
            if name.startswith("vision_tower.") and "norm" in name:  # SigLIP's LayerNorm: plain w and b
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("norm.weight"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def embed(self, tokens: Tensor) -> Tensor:
        x = self.model.embed_tokens(tokens)
        # The normalizer is rounded to the compute dtype first (fp32 -> dtype, as the reference does).
        return x * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(x.dtype)

    def hidden(self, tokens: Tensor | None = None, positions: Tensor | None = None,
               cache: list[KVCache] | None = None, embeds: Tensor | None = None,
               segment_ids: Tensor | None = None, image_mask: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [B, T, d_model].

        tokens [B, T] (or `embeds` [B, T, d_model] already scaled, e.g. with image soft tokens);
        positions [B, T] absolute positions, -1 for left padding (default 0..T-1 after the cache);
        cache: one KVCache per layer from `make_cache`, updated in place;
        segment_ids [B, T]: packed documents that must not attend to each other (no cache);
        image_mask [B, T]: True on image soft tokens; each run of them (one image) attends
        bidirectionally within itself (see vision.embed_with_images).
        """
        x = self.embed(tokens) if embeds is None else embeds
        b, t = x.shape[:2]
        if positions is None:
            start = cache[0].offset if cache else 0
            positions = torch.arange(start, start + t, device=x.device).expand(b, t)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for packed training sequences, not cached decoding")
        last = None
        if image_mask is not None and bool(image_mask.any()):
            if cache is not None and bool(image_mask[:, -1].any()):
                raise ValueError("an image's soft tokens must all be in one forward pass (prefill it whole)")
            last = image_last_positions(image_mask, positions)
        rope = {kind: rope_cos_sin(positions, f, x.dtype) for kind, f in self.inv_freq.items()}
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope[layer.kind]
            x = layer(x, cos, sin, positions, cache[i] if cache else None, segment_ids, last)
        return self.model.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """Tied LM head (the embedding, unscaled) plus Gemma 2's final soft-cap."""
        emb = self.model.embed_tokens
        # A quantized table (gemmakit.quant, swapped in from outside) computes h @ E^T itself.
        logits = emb.attend(h) if hasattr(emb, "attend") else h @ emb.weight.T
        if (cap := self.config.final_softcap) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, tokens: Tensor | None = None, positions: Tensor | None = None,
                cache: list[KVCache] | None = None, embeds: Tensor | None = None,
                segment_ids: Tensor | None = None, image_mask: Tensor | None = None) -> Tensor:
        return self.logits(self.hidden(tokens, positions, cache, embeds, segment_ids, image_mask))


def build(config: Config, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> Gemma:
    """The model with uninitialized storage on `device` (meta: shapes only, no memory)."""
    if dtype == torch.float16:
        raise ValueError("float16 is not supported: Gemma activations overflow it; use bfloat16 or float32")
    with torch.device(device):
        model = Gemma(config)
    return model.to(dtype)
