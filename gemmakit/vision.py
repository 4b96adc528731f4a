"""Gemma 3's eyes: the SigLIP vision tower, the multimodal projector, and the glue that puts the
projected image embeddings into a prompt.

Module attribute names equal the keys of Google's published Gemma 3 checkpoints
(`vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight`,
`multi_modal_projector.mm_input_projection_weight`), so `Gemma` (model.py) attaches these two modules
under those names when `config.vision` is set and the whole model loads with one strict state dict.
No I/O here: images arrive as pixel tensors from gemmakit/image.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.config import Config, VisionConfig
from gemmakit.model import RMSNorm

if TYPE_CHECKING:  # the chat glue at the end uses the tokenizer, which sits above the model in the imports
    from gemmakit.tokenizer import Tokenizer

BOI_ID, EOI_ID = 255999, 256000  # <start_of_image>, <end_of_image> (Gemma 3 vocabulary)


# -- SigLIP vision tower (a plain pre-norm ViT without a pooling head) ----------------------------

class VisionEmbeddings(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        # A stride-p convolution is the ViT patchify + linear projection in one op.
        self.patch_embedding = nn.Conv2d(3, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size)
        self.position_embedding = nn.Embedding(v.patches_per_side**2, v.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, h, s, s]
        x = x.flatten(2).transpose(1, 2)  # row-major patch order, as the position table was learned
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        h = v.hidden_size
        self.n_heads = v.n_heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: Tensor) -> Tensor:
        n, t, h = x.shape
        q, k, v = (p(x).view(n, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch; scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, h))


class VisionMLP(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.norm_eps)
        self.self_attn = VisionAttention(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.norm_eps)
        self.mlp = VisionMLP(v)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(v) for _ in range(v.n_layers))


class VisionTransformer(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(v)
        self.encoder = VisionEncoder(v)
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.norm_eps)


class VisionTower(nn.Module):
    """HF's `vision_tower`: pixels [N, 3, S, S] (already normalized) -> patch states [N, (S/p)^2, hidden]."""

    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.config = v
        self.vision_model = VisionTransformer(v)

    def forward(self, pixels: Tensor) -> Tensor:
        s = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel tensor of shape {tuple(pixels.shape)}; the vision tower takes [N, 3, {s}, {s}]")
        m = self.vision_model
        x = m.embeddings(pixels)
        for layer in m.encoder.layers:
            x = layer(x)
        return m.post_layernorm(x)


class MultiModalProjector(nn.Module):
    """Patch states -> `tokens_per_image` soft tokens in the text model's width.

    Average-pool the patch grid (64x64 -> 16x16 for the real tower), RMSNorm with Gemma's (1 + w),
    then a bias-free projection stored as [vision_hidden, d_model] (x @ W, not a Linear's W^T).
    """

    def __init__(self, v: VisionConfig, d_model: int) -> None:
        super().__init__()
        side = int(round(v.tokens_per_image**0.5))
        if side * side != v.tokens_per_image or v.patches_per_side % side:
            raise ValueError(f"{v.tokens_per_image} tokens per image is not a square grid that pools "
                             f"a {v.patches_per_side}x{v.patches_per_side} patch grid evenly")
        self.patches_per_side, self.kernel = v.patches_per_side, v.patches_per_side // side
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(v.hidden_size, d_model))
        self.mm_soft_emb_norm = RMSNorm(v.hidden_size, v.norm_eps)

    def forward(self, patches: Tensor) -> Tensor:
        n, _, h = patches.shape
        s = self.patches_per_side
        grid = patches.transpose(1, 2).reshape(n, h, s, s)
        pooled = F.avg_pool2d(grid, self.kernel).flatten(2).transpose(1, 2)  # [N, tokens, h], row-major
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(patches)


# -- glue: prompt ids with image placeholders -> input embeddings ----------------------------------

def require_vision(config: Config) -> VisionConfig:
    """The vision config, or the error every image path gives for a text-only model."""
    if config.vision is None:
        raise ValueError(f"{config.name} has no vision tower: it is a text-only model and cannot take images")
    return config.vision


def encode_images(model: nn.Module, pixels: Tensor) -> Tensor:
    """Soft tokens [N, tokens_per_image, d_model] for N preprocessed images (see image.py)."""
    require_vision(model.config)
    return model.multi_modal_projector(model.vision_tower(pixels.to(model.dtype)))


def embed_with_images(model: nn.Module, tokens: Tensor, pixels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Prompt embeddings [B, T, d_model] and the image-token mask [B, T] for `model.hidden`.

    `tokens` holds `config.image_token_id` once per soft token; `pixels` [N, 3, S, S] are the images
    in the order their placeholders appear (row by row). Text tokens get the usual sqrt(d_model)-scaled
    embedding; soft tokens get the projected vision embeddings, deliberately *not* scaled.
    """
    config: Config = model.config
    is_image = tokens == config.image_token_id if config.image_token_id is not None else None
    n_slots = int(is_image.sum()) if is_image is not None else 0
    if pixels is None or len(pixels) == 0:
        if n_slots:
            raise ValueError(f"the prompt has {n_slots} image soft tokens but no image was given")
        return model.embed(tokens), None
    soft = encode_images(model, pixels)
    if n_slots != soft.shape[0] * soft.shape[1]:
        raise ValueError(f"{soft.shape[0]} image(s) need {soft.shape[0] * soft.shape[1]} soft tokens in the "
                         f"prompt, found {n_slots}")
    # The placeholder id may lie outside a text-only vocabulary; embed a harmless id there instead.
    x = model.embed(tokens.masked_fill(is_image, 0))
    x = x.masked_scatter(is_image[..., None], soft.to(x.dtype).reshape(-1))
    return x, is_image


def image_token_block(tokens_per_image: int, image_token_id: int) -> list[int]:
    """The ids between `<start_of_image>` and `<end_of_image>`: one placeholder per soft token."""
    return [image_token_id] * tokens_per_image


def expand_image_tokens(ids: list[int], tokens_per_image: int, image_token_id: int) -> list[int]:
    """Insert the soft-token placeholders after every `<start_of_image>` of a tokenized prompt.

    The text side renders each image as "\\n\\n<start_of_image><end_of_image>\\n\\n" (see
    image_text); both markers are special tokens, so tokenizing that and inserting the
    placeholders here gives exactly the ids of the full 256-placeholder string.
    """
    out: list[int] = []
    for i in ids:
        out.append(i)
        if i == BOI_ID:
            out.extend(image_token_block(tokens_per_image, image_token_id))
    return out


# -- prompt text -------------------------------------------------------------------------------------

MARKER = "<start_of_image>"  # where an image goes in a prompt or chat turn (the chat template's placeholder)
IMAGE_TEXT = "\n\n<start_of_image><end_of_image>\n\n"  # one image view, before expand_image_tokens


def image_text(num_crops: int = 0) -> str:
    """The text one image becomes: its view, or with Pan & Scan crops the reference's sentence
    "Here is the original image <image> and here are some crops to help you see better <image> ..."."""
    return "".join(image_segments(num_crops, 0, 0))  # the placeholders come later (expand_image_tokens)


def insert_images(text: str, num_crops: list[int]) -> str:
    """Replace the i-th `<start_of_image>` in `text` by image i's text; with no marker at all, the
    images go first (as the chat template puts an image before the turn's text)."""
    found = text.count(MARKER)
    if found == 0:
        text = MARKER * len(num_crops) + text
    elif found != len(num_crops):
        raise ValueError(f"the prompt has {found} {MARKER} markers for {len(num_crops)} image(s)")
    parts = text.split(MARKER)
    return parts[0] + "".join(image_text(n) + rest for n, rest in zip(num_crops, parts[1:]))


def prompt_ids(encode: Callable[[str], list[int]], config: Config, text: str, num_crops: list[int]) -> list[int]:
    """Token ids of a raw prompt `text` carrying images with `num_crops` crops each: image text in place
    of the markers (insert_images), tokenized by `encode`, placeholders inserted. A raw prompt is the
    user's own template, so its control-token text is parsed; chats go through `chat_prompt_ids`."""
    if not num_crops:
        return encode(text)
    v = require_vision(config)
    return expand_image_tokens(encode(insert_images(text, num_crops)), v.tokens_per_image, config.image_token_id)


def image_segments(num_crops: int, tokens_per_image: int, image_token_id: int) -> list[str | int]:
    """`image_text(num_crops)` with its placeholders, as chat segments (see tokenizer.encode_segments):
    the markers are `Special` tokens, the placeholders ids, the rest plain text."""
    from gemmakit.tokenizer import Special

    view = ["\n\n", Special(MARKER), *image_token_block(tokens_per_image, image_token_id),
            Special("<end_of_image>"), "\n\n"]  # IMAGE_TEXT with the placeholders in
    if not num_crops:
        return view
    out = ["Here is the original image ", *view, " and here are some crops to help you see better "]
    for i in range(num_crops):  # the views joined by " "
        out += [" "] * (i > 0) + view
    return out


def chat_prompt_ids(tokenizer: Tokenizer, config: Config, messages: list[dict[str, Any]],
                    num_crops: list[int]) -> list[int]:
    """Ids of a chat (Google's template for `config.generation`, generation prompt included) whose image
    parts, in order, are images with `num_crops` crops each.

    Built from the template's segments: message text is tokenized as plain text, so a typed
    "<end_of_turn>" or "<start_of_image>" stays text; only the template and the image parts place
    control tokens. Where the text holds no control-token text, the ids equal tokenizing the rendered
    template with the image text in place as one string (what transformers' Gemma3Processor does).
    Raises ValueError when the image parts and `num_crops` differ in number, or for images on a
    text-only model.
    """
    from gemmakit.tokenizer import Special, chat_segments, encode_segments

    segments = chat_segments(messages, config.generation)
    found = sum(isinstance(s, Special) and s == MARKER for s in segments)
    if found != len(num_crops):
        raise ValueError(f"the chat has {found} image part(s) for {len(num_crops)} image(s)")
    if num_crops:
        v = require_vision(config)
        crops = iter(num_crops)
        segments = [p for s in segments for p in (
            image_segments(next(crops), v.tokens_per_image, config.image_token_id)
            if isinstance(s, Special) and s == MARKER else [s])]
    return encode_segments(tokenizer, segments)
