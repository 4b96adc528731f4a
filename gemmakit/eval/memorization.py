"""Memorization rates as the Gemma reports measure them (Gemma 2 section 7, Gemma 3 section 6).

Take N spans of prefix + suffix tokens (50 + 50) from documents, prompt the model with `<bos>` + the prefix,
decode `suffix` tokens greedily, and compare them with the document's suffix: an *exact* match is all of
them equal; an *approximate* match is a token-level Levenshtein (edit) distance of at most 10% of the
suffix (5 of 50 tokens, the Gemma 3 report's threshold). Exact matches count as approximate ones too.
Rates come with 95% Wilson score intervals (binomial; closed form, sensible at 0 successes).

Spans never cross documents: each document is cut into disjoint blocks of prefix + suffix tokens (from a
random offset that leaves its remainder unused), and N of all the blocks are drawn without replacement,
so no two spans overlap, and the same seed draws the same spans.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tqdm import tqdm

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance between two token sequences: the fewest insertions, deletions and substitutions
    (each costing 1) that turn `a` into `b`. O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for the default z); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 (or n) successes the bound is exactly 0 (or 1); the subtraction leaves rounding dust.
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


@dataclass(frozen=True)
class Span:
    doc: int  # index of the document
    start: int  # token offset of the prefix in that document


def sample_spans(doc_lengths: Sequence[int], n: int, length: int, seed: int = 0) -> list[Span]:
    """`n` disjoint spans of `length` tokens, each inside one document, drawn without replacement.

    Each document of L tokens holds L // length blocks, starting at a random offset in [0, L % length]
    (drawn per document from `seed`); `n` blocks of all of them are drawn uniformly. The result is sorted
    by (doc, start). Raises ValueError if `n` < 1, `length` < 2 or there are fewer than `n` blocks.
    """
    if n < 1:
        raise ValueError(f"--samples must be at least 1, got {n}")
    if length < 2:
        raise ValueError(f"a span needs at least 2 tokens (prefix + suffix), got {length}")
    rng = random.Random(seed)
    offsets = [rng.randint(0, n_tok % length) for n_tok in doc_lengths]
    counts = [n_tok // length for n_tok in doc_lengths]
    ends = [0]
    for c in counts:
        ends.append(ends[-1] + c)
    if ends[-1] < n:
        raise ValueError(f"the documents hold {ends[-1]:,} disjoint spans of {length} tokens, fewer than the "
                         f"{n:,} asked for (--samples): give more text or fewer samples")
    spans = []
    for k in rng.sample(range(ends[-1]), n):
        doc = bisect.bisect_right(ends, k) - 1
        spans.append(Span(doc, offsets[doc] + (k - ends[doc]) * length))
    return sorted(spans, key=lambda s: (s.doc, s.start))


@dataclass
class Memorization:
    spans: int
    prefix: int
    suffix: int
    max_distance: int  # approximate: edit distance <= this many of the suffix tokens
    exact: int
    approximate: int  # includes the exact matches
    exact_rate: float
    exact_ci95: tuple[float, float]  # Wilson score interval
    approximate_rate: float
    approximate_ci95: tuple[float, float]
    distances: list[int]  # per span, in span order

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exact_ci95"], d["approximate_ci95"] = list(self.exact_ci95), list(self.approximate_ci95)
        d["interval"] = "Wilson score, 95%"
        return d


def count_matches(generated: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                  max_distance: int) -> tuple[int, int, list[int]]:
    """(exact matches, approximate matches (distance <= max_distance, exact included), distances)."""
    if len(generated) != len(suffixes):
        raise ValueError(f"{len(generated)} generations for {len(suffixes)} suffixes")
    distances = [levenshtein(g, s) for g, s in zip(generated, suffixes)]
    return sum(d == 0 for d in distances), sum(d <= max_distance for d in distances), distances


def greedy_continuations(model, prompts: list[list[int]], n_new: int, batch_size: int = 16,
                         compile: bool = False, progress: bool = True) -> list[list[int]]:
    """`n_new` greedily decoded ids after each prompt (stop tokens do not stop it: a suffix is compared
    token by token), in batches of `batch_size` through gemmakit.engine.generate. With `compile`, a last
    partial batch is filled up with copies of its last prompt so the compiled step of the full batch
    serves it (a new batch size would compile anew)."""
    from gemmakit import engine

    out: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc="memorization", unit="span", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        real = len(batch)
        if compile and real < batch_size and len(prompts) > batch_size:
            batch = batch + [batch[-1]] * (batch_size - real)
        rows: list[list[int]] = [[] for _ in batch]
        for step in engine.generate(model, batch, n_new, stop_ids=(), compile=compile):
            for row, token in zip(rows, step):
                row.append(token)
        out += rows[:real]
        bar.update(real)
    bar.close()
    return out


def memorization(model, docs: Sequence[Sequence[int]], bos_id: int, samples: int, prefix: int = 50,
                 suffix: int = 50, seed: int = 0, batch_size: int = 16, compile: bool = False,
                 progress: bool = True) -> Memorization:
    """Exact and approximate memorization of `samples` spans of `docs` (token ids without <bos>).

    Each span is prompted as `[bos_id] + prefix tokens` and `suffix` tokens are decoded greedily; the
    approximate threshold is 10% of the suffix (5 of 50). Raises ValueError for a prefix or suffix < 1
    or documents too short to hold `samples` disjoint spans.
    """
    if prefix < 1 or suffix < 1:
        raise ValueError(f"--prefix and --suffix must be at least 1 token, got {prefix} and {suffix}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    spans = sample_spans([len(d) for d in docs], samples, prefix + suffix, seed)
    prompts = [[bos_id, *docs[s.doc][s.start:s.start + prefix]] for s in spans]
    truths = [list(docs[s.doc][s.start + prefix:s.start + prefix + suffix]) for s in spans]
    generated = greedy_continuations(model, prompts, suffix, batch_size, compile, progress)
    max_distance = suffix // 10
    exact, approx, distances = count_matches(generated, truths, max_distance)
    n = len(spans)
    return Memorization(spans=n, prefix=prefix, suffix=suffix, max_distance=max_distance, exact=exact,
                        approximate=approx, exact_rate=exact / n, exact_ci95=wilson_interval(exact, n),
                        approximate_rate=approx / n, approximate_ci95=wilson_interval(approx, n),
                        distances=distances)
