"""KV caches: a static cache for global layers, a ring buffer of `window` slots for local layers.

Every cache slot remembers the absolute position of the token it holds (per sequence, -1 = empty),
so the model builds its attention mask from positions alone: the same rule serves a fresh forward,
a static cache, a wrapped ring buffer and left-padded batches.

Where a token goes follows from its position alone, for each sequence (row) on its own: slot = position
in a static cache, position % size in a ring. So the rows of one cache need not advance together: left
padding (position -1) is never written, and the scheduler (gemmakit.serve) keeps a different sequence,
at its own length, in every row.
"""

from __future__ import annotations

import torch

from gemmakit.config import LOCAL, Config


class KVCache:
    """`size` slots per layer and row: slot = position, or position % size when `ring`."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, size: int, ring: bool,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        self.size, self.ring = size, ring
        self.k = torch.zeros(batch, n_kv_heads, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, size), -1, dtype=torch.long, device=device)
        # Columns fed so far (the batch's; padding included): only the default positions of the next
        # input (Gemma.hidden) read it. A tensor, not an int, so that a compiled decode step advances it
        # in place instead of recompiling for every value.
        self.step = torch.zeros((), dtype=torch.long, device=device)

    @property
    def offset(self) -> int:
        return int(self.step)

    def rows(self, start: int, end: int) -> KVCache:
        """Rows start..end-1 as a cache of their own that shares this one's storage (writes go through;
        contiguous, as the batch is the outer dimension). Its `step` is its own."""
        c = KVCache.__new__(KVCache)
        c.size, c.ring = self.size, self.ring
        c.k, c.v, c.pos = self.k[start:end], self.v[start:end], self.pos[start:end]
        c.step = torch.zeros((), dtype=torch.long, device=self.k.device)
        return c

    def truncate(self, i: int, length: int) -> None:
        """Forget row `i`'s tokens at positions >= `length` (its slots become empty)."""
        p = self.pos[i]
        p.masked_fill_(p >= length, -1)

    def holds(self, written: int, length: int) -> bool:
        """Whether a row to which positions 0..written-1 were written still has every key that the
        positions from `length` on need, once truncated to `length` (<= written): a static cache always;
        a ring only while it still holds the window before `length`, i.e. nothing needed was overwritten."""
        return length <= written and (not self.ring or length == 0 or written <= self.size or length >= written - 1)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, H, T, D] at positions [B, T] (-1: padding, not stored); return what
        the queries attend to: keys, values [B, H, S, D] and their positions [B, S].

        The result may include empty slots (position -1): the mask, built from positions, hides them.
        """
        t, dtype = k.shape[2], k.dtype
        if t == 1:
            return self._decode(k, v, pos)
        valid = pos >= 0
        if self.ring:
            # The new tokens must see the old window *and* each other, so they attend to old ++ new (a
            # local layer's prefill costs its window plus the chunk), of which only each row's newest
            # `size` positions are kept.
            keys = torch.cat([self.k.to(dtype), k], dim=2)
            values = torch.cat([self.v.to(dtype), v], dim=2)
            positions = torch.cat([self.pos, pos], dim=1)
            valid &= pos > pos.amax(1, keepdim=True) - self.size
        else:
            end = int(pos.max()) + 1
            if end > self.size:
                raise ValueError(f"KV cache holds {self.size} tokens; {end} do not fit")
        rows, cols = valid.nonzero(as_tuple=True)
        p = pos[rows, cols]
        slots = p % self.size if self.ring else p
        self.k[rows, :, slots] = k[rows, :, cols].to(self.k.dtype)
        self.v[rows, :, slots] = v[rows, :, cols].to(self.v.dtype)
        self.pos[rows, slots] = p
        self.step += t
        if self.ring:
            return keys, values, positions
        # A global layer attends to the cached prefix plus the new tokens, not to the empty slots after.
        return self.k[:, :, :end].to(dtype), self.v[:, :, :end].to(dtype), self.pos[:, :end]

    def _decode(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One token per row, written in place at its own slot: static shapes, no host sync (compile-
        # friendly). In a full ring the slot overwritten holds position q - W, the first one out of the
        # window. A row at position -1 (an empty or waiting slot of the scheduler) writes its slot's old
        # contents back: nothing changes.
        p = pos[:, 0]
        if not self.ring and not torch.compiler.is_compiling() and int(p.max()) >= self.size:
            raise ValueError(f"KV cache holds {self.size} tokens; it is full")
        valid = p >= 0
        slot = p % self.size if self.ring else p.clamp(min=0)
        rows = torch.arange(p.shape[0], device=p.device)
        keep = valid[:, None, None]
        self.k[rows, :, slot] = torch.where(keep, k[:, :, 0].to(self.k.dtype), self.k[rows, :, slot])
        self.v[rows, :, slot] = torch.where(keep, v[:, :, 0].to(self.v.dtype), self.v[rows, :, slot])
        self.pos[rows, slot] = torch.where(valid, p, self.pos[rows, slot])
        self.step += 1
        return self.k.to(k.dtype), self.v.to(k.dtype), self.pos

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
