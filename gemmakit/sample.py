"""Sampling as pure functions on logits [B, V]: filters return new logits, `sample` picks ids [B].

Filters set excluded entries to -inf and never renormalize: softmax does that once at the end.
Randomness only comes from the `torch.Generator` passed in, so a seed makes a run repeatable.
"""

from __future__ import annotations

import torch
from torch import Tensor


def greedy(logits: Tensor) -> Tensor:
    """The most likely id of each row (ties: the lowest id, as argmax defines it)."""
    return logits.argmax(dim=-1)


def top_k(logits: Tensor, k: int) -> Tensor:
    """Keep each row's k largest logits (ties with the k-th are kept too)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely ids whose probability reaches p."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # Drop an id when the ids strictly more likely than it already reach p: the most likely id always
    # survives, and so does the one that crosses p.
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p(logits: Tensor, p: float) -> Tensor:
    """Keep ids whose probability is at least p times the most likely id's probability."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p}")
    # prob_i >= p * prob_max  <=>  logit_i >= logit_max + log(p): no softmax needed.
    floor = logits.float().amax(dim=-1, keepdim=True) + torch.log(torch.tensor(p))
    return logits.masked_fill(logits.float() < floor, float("-inf"))


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty as transformers applies it: for ids already in the sequence (`seen`,
    a bool mask [B, V] over the prompt and the generated ids) a positive logit is divided by `penalty`,
    a negative one multiplied, so penalty > 1 always makes a repeat less likely. 1 changes nothing."""
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    x = logits.float()
    return torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, repetition_penalty: float | None = None) -> None:
    """Raise ValueError naming the first out-of-range setting, before any model work is done.

    Each message starts with the keyword's name (e.g. "top_p must be in (0, 1], got 1.5").
    """
    if not temperature >= 0:  # `not >=` also catches NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


# sample()'s keyword arguments shadow the filter names inside it.
_top_k, _top_p, _min_p = top_k, top_p, min_p


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next ids [B] from logits [B, V]. temperature 0 is greedy (the filters cannot change the argmax).

    Order as in most samplers: temperature, then top-k, top-p, min-p, then one categorical draw.
    Settings out of range raise ValueError (check_sampling), even those greedy decoding ignores.
    """
    check_sampling(temperature, top_k, top_p, min_p)
    if temperature == 0.0:
        return greedy(logits)
    x = logits.float() / temperature
    if top_k is not None:
        x = _top_k(x, top_k)
    if top_p is not None:
        x = _top_p(x, top_p)
    if min_p is not None:
        x = _min_p(x, min_p)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
