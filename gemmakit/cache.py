"""KV caches: a static cache for global layers, a ring buffer of `window` slots for local layers.

Every cache slot remembers the absolute position of the token it holds (per sequence, -1 = empty),
so the model builds its attention mask from positions alone: the same rule serves a fresh forward,
a static cache, a wrapped ring buffer and left-padded batches.
"""

from __future__ import annotations

import torch

from gemmakit.config import LOCAL, Config


class KVCache:
    """`size` slots per layer, written in order. A ring buffer when `ring`: slot = step % size."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, size: int, ring: bool,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        self.size, self.ring = size, ring
        self.k = torch.zeros(batch, n_kv_heads, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, size), -1, dtype=torch.long, device=device)
        # Tokens written so far (shared by the batch; padding has position -1). A tensor, not an int,
        # so that a compiled decode step advances it in place instead of recompiling for every value.
        self.step = torch.zeros((), dtype=torch.long, device=device)

    @property
    def offset(self) -> int:
        return int(self.step)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, H, T, D] at positions [B, T]; return what the queries attend to.

        The result may include empty slots (position -1): the mask, built from positions, hides them.
        """
        t, dtype = k.shape[2], k.dtype
        if t == 1:
            # Decode: one token, written in place; static shapes, no host sync (compile-friendly).
            # In a full ring the slot overwritten holds position q - W, the first one out of the window.
            if not self.ring and not torch.compiler.is_compiling() and self.offset >= self.size:
                raise ValueError(f"KV cache holds {self.size} tokens; it is full")
            slot = (self.step % self.size if self.ring else self.step).view(1)
            self.k.index_copy_(2, slot, k.to(self.k.dtype))
            self.v.index_copy_(2, slot, v.to(self.v.dtype))
            self.pos.index_copy_(1, slot, pos)
            self.step += 1
            return self.k.to(dtype), self.v.to(dtype), self.pos
        offset = self.offset
        if not self.ring:
            if offset + t > self.size:
                raise ValueError(f"KV cache holds {self.size} tokens; {offset} + {t} do not fit")
            end = offset + t
            self.k[:, :, offset:end] = k
            self.v[:, :, offset:end] = v
            self.pos[:, offset:end] = pos
            self.step += t
            return self.k[:, :, :end].to(dtype), self.v[:, :, :end].to(dtype), self.pos[:, :end]
        # Ring: the new tokens must see the old window *and* each other, so attend to old ++ new
        # (a prompt longer than the window is prefilled in one pass), then keep only the newest `size`.
        keys = torch.cat([self.k.to(dtype), k], dim=2)
        values = torch.cat([self.v.to(dtype), v], dim=2)
        positions = torch.cat([self.pos, pos], dim=1)
        keep = min(t, self.size)
        slots = torch.arange(offset + t - keep, offset + t, device=self.k.device) % self.size
        self.k[:, :, slots] = k[:, :, t - keep:].to(self.k.dtype)
        self.v[:, :, slots] = v[:, :, t - keep:].to(self.v.dtype)
        self.pos[:, slots] = pos[:, t - keep:]
        self.step += t
        return keys, values, positions

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def cache_sizes(config: Config, max_len: int) -> list[int]:
    """Slots each layer needs for sequences of up to `max_len` tokens."""
    return [min(config.sliding_window, max_len) if kind == LOCAL else max_len for kind in config.layer_types]


def make_cache(config: Config, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> list[KVCache]:
    """One cache per layer: global layers hold `max_len` tokens, local layers only their window."""
    if max_len > config.max_seq_len:
        raise ValueError(f"{max_len} tokens exceed {config.name}'s context of {config.max_seq_len}")
    return [
        KVCache(batch, config.n_kv_heads, config.head_dim, size, ring=kind == LOCAL and size < max_len,
                dtype=dtype, device=device)
        for kind, size in zip(config.layer_types, cache_sizes(config, max_len))
    ]


def cache_bytes(config: Config, batch: int, max_len: int, bytes_per_value: int = 2,
                global_only: bool = False) -> int:
    """KV memory as `make_cache` builds it (or as an all-global cache would need), without allocating."""
    sizes = [max_len] * config.n_layers if global_only else cache_sizes(config, max_len)
    return 2 * batch * config.n_kv_heads * config.head_dim * bytes_per_value * sum(sizes)
