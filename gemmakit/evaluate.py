"""Perplexity of a model on a token stream, in non-overlapping windows.

Each window is `<bos>` followed by the next `context - 1` tokens of the text, scored on its own: every
text token is predicted exactly once, from the tokens before it in its window. A window is run in
chunks through the KV cache, so a long context never materializes a [T, T] score matrix or a
[T, vocab] logit matrix for the whole window at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gemmakit.cache import make_cache
from gemmakit.model import Gemma


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens (the text's tokens, <bos> excluded)
    windows: int
    context: int


def windows(text_ids: list[int], context: int, bos_id: int) -> list[list[int]]:
    """`[bos] + next (context - 1) text tokens`, until the text is used up: exactly one <bos> per
    window, at position 0. Raises ValueError if `text_ids` holds a <bos> itself (a window would start
    with two, as a text encoded with parse_special=True that says "<bos>" would give)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens (<bos> + one token), got {context}")
    if bos_id in text_ids:
        raise ValueError(f"the text's ids hold <bos> (id {bos_id}) at position {text_ids.index(bos_id)}: pass the "
                         f"text without it, encoded as plain text (parse_special=False); each window gets one <bos>")
    step = context - 1
    return [[bos_id, *text_ids[i:i + step]] for i in range(0, len(text_ids), step)]


@torch.inference_mode()
def window_nll(model: Gemma, ids: list[int], chunk: int = 512) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1, and the count, in fp32."""
    cache = make_cache(model.config, 1, len(ids), model.dtype, model.model.embed_tokens.weight.device)
    tokens = torch.tensor([ids], device=model.model.embed_tokens.weight.device)
    total = 0.0
    for start in range(0, len(ids) - 1, chunk):
        x = tokens[:, start:min(start + chunk, len(ids) - 1)]
        logits = model(x, cache=cache)[0].float()
        target = tokens[0, start + 1:start + 1 + x.shape[1]]
        total += F.cross_entropy(logits, target, reduction="sum").item()
    return total, len(ids) - 1


def perplexity(model: Gemma, text_ids: list[int], bos_id: int, context: int | None = None,
               progress: bool = True) -> Perplexity:
    """exp(mean NLL) of `text_ids` (no <bos>) in windows of `context` tokens; default: one window
    holding the whole text if it fits the model's context, else windows of the full context."""
    if not text_ids:
        raise ValueError("no tokens to score: the text is empty")
    limit = model.config.max_seq_len
    if context is None:
        context = min(len(text_ids) + 1, limit)
    if context > limit:
        raise ValueError(f"context of {context} tokens exceeds {model.config.name}'s context length of {limit}")
    ws = windows(text_ids, context, bos_id)
    nll = count = 0
    bar = tqdm(total=len(text_ids), desc="perplexity", unit="tok", disable=not progress, leave=False)
    for w in ws:
        s, n = window_nll(model, w)
        nll, count = nll + s, count + n
        bar.update(n)
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    bar.close()
    return Perplexity(perplexity=math.exp(nll / count), nll=nll / count, tokens=count, windows=len(ws),
                      context=context)
