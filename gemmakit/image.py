"""Image files -> pixel tensors for Gemma 3's vision tower (Pillow + torch only).

Preprocessing as Google trained it (and as transformers' Gemma3ImageProcessor does): RGB (transparency
composited onto white), bilinear resize to the tower's square size, x / 255, then (x - 0.5) / 0.5.
Pan & Scan (off by default) adds crops of very wide or tall images after the original.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gemmakit.config import Config
from gemmakit.vision import require_vision


@dataclass(frozen=True)
class PanScan:
    """Pan & Scan parameters (the defaults are transformers' and the Gemma 3 report's)."""

    min_crop_size: int = 256  # no crops when a crop's short side would be under this many pixels
    max_crops: int = 4  # at most this many crops (and at least 2 when cropping at all)
    min_ratio: float = 1.2  # crop only when long side / short side >= this


def _pil() -> Any:
    try:
        import PIL.Image
    except ImportError:  # pragma: no cover - depends on the install
        raise ValueError("images need Pillow: pip install 'gemmakit[vision]'") from None
    return PIL.Image


def load_image(path: str | os.PathLike) -> Any:
    """Open, fully decode and convert an image file to RGB; one-line errors that name the file."""
    Image = _pil()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse the whole range.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now, so a truncated file fails here and not halfway through a resize
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path}: image too large (over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels; "
                         "refused as a possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: truncated or corrupt image ({e})") from None


def to_rgb(img: Any) -> Any:
    """RGB copy of a PIL image; transparency is composited onto white, as the reference does."""
    Image = _pil()
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def pan_and_scan_boxes(width: int, height: int, p: PanScan = PanScan()) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) of Pan & Scan, side by side without overlap; [] for none.

    Landscape (w >= h; portrait is the same turned): nothing below the aspect ratio `min_ratio`;
    n = round-half-up(w / h), at most w // min_crop_size, clamped to [2, max_crops]; each crop is
    ceil(w / n) wide (the last one narrower) and full height; nothing if a crop's short side < min_crop_size.
    """
    long, short = max(width, height), min(width, height)
    if long / short < p.min_ratio:
        return []
    n = int(math.floor(long / short + 0.5))
    n = min(long // p.min_crop_size, n)
    n = min(p.max_crops, max(2, n))
    step = int(math.ceil(long / n))
    if min(step, short) < p.min_crop_size:
        return []
    if width >= height:
        return [(i * step, 0, min((i + 1) * step, width), height) for i in range(n)]
    return [(0, i * step, width, min((i + 1) * step, height)) for i in range(n)]


def to_pixels(img: Any, size: int) -> Tensor:
    """[3, size, size] float32: bilinear resize (Pillow's, as the reference), x / 255, (x - 0.5) / 0.5."""
    Image = _pil()
    img = img.resize((size, size), resample=Image.BILINEAR)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def preprocess(image: Any, size: int, pan_and_scan: PanScan | None = None) -> Tensor:
    """Pixel tensor [1 + n_crops, 3, size, size] for one image (path or PIL image): the original first,
    then its Pan & Scan crops (none unless `pan_and_scan` is given and the image is wide or tall enough)."""
    img = load_image(image) if isinstance(image, (str, os.PathLike)) else to_rgb(image)
    views = [img]
    if pan_and_scan is not None:
        views += [img.crop(box) for box in pan_and_scan_boxes(img.width, img.height, pan_and_scan)]
    return torch.stack([to_pixels(v, size) for v in views])


def load_images(paths: list[str | os.PathLike], config: Config, pan_and_scan: PanScan | None = None
                ) -> tuple[Tensor, list[int]]:
    """All views of all images for `config`'s tower, concatenated [N, 3, S, S], and each image's crop count."""
    size = require_vision(config).image_size
    views = [preprocess(p, size, pan_and_scan) for p in paths]
    return torch.cat(views), [len(v) - 1 for v in views]
