"""Inference-time sliding window override (Gemma 2 report, Table 10: a model trained with a 4,096-token
window evaluated at 2,048 and 1,024).

Only the window of the local layers changes; weights, global layers and RoPE stay as trained. Everything
that sizes a cache reads `model.config.sliding_window` (cache.make_cache), and every local Attention
masks with its own `window`, so both are set together, from outside the model code.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from gemmakit.config import LOCAL, Config

if TYPE_CHECKING:  # cli.py builds its parsers from here: no torch import until a model is used
    from gemmakit.model import Gemma


def check_sliding_window(config: Config, window: int) -> None:
    """Raise ValueError (one line) unless `window` >= 1 and `config` has local (sliding-window) layers."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"--sliding-window must be a whole number of tokens >= 1, got {window!r}")
    if LOCAL not in config.layer_types:
        raise ValueError(f"--sliding-window: {config.name} (Gemma {config.generation}) has no local "
                         f"(sliding-window) layers, only global ones: there is no window to change")


def set_sliding_window(model: Gemma, window: int) -> Gemma:
    """`model` itself, changed in place to attend over `window` tokens in its local layers.

    model.config becomes a copy with `sliding_window=window` (so caches from make_cache get `window` ring
    slots per local layer), and every local layer's Attention.window is set to it; global layers keep
    attending to everything. A window larger than the trained one is allowed (the model never saw those
    distances in local layers). Raises ValueError for window < 1 or a model without local layers.
    Build caches after this call: a cache made before it has the old size.
    """
    check_sliding_window(model.config, window)
    model.config = model.config.replace(sliding_window=window)
    for layer in model.model.layers:
        if layer.kind == LOCAL:
            layer.self_attn.window = window
    return model


def add_sliding_window_arg(parser: argparse.ArgumentParser) -> None:
    """`--sliding-window N` on a command that loads a model (generate, chat, perplexity, eval)."""
    parser.add_argument("--sliding-window", type=int, default=None, metavar="N",
                        help="attend over N tokens in the local (sliding-window) layers instead of the trained "
                             "window (512 for Gemma 3 270M/1B, 1024 for 4B+, 4096 for Gemma 2), with the KV cache "
                             "sized to match; N larger than the trained window is allowed but untrained. Gemma 1 "
                             "has no local layers (an error). Default: the trained window")
