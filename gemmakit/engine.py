"""Prefill + decode as a token generator: batched prompts of different lengths, per-sequence stops.

`generate` is the one loop that the CLI, the chat REPL and the benchmarks consume; `stream_text` turns its
ids into text with stop strings (what the CLI prints), `generate_text` returns that text. Prompts are left
padded (padding gets position -1, which the model's mask hides), prefilled in chunks through the KV
cache (`prefill`: a local layer attends to its window plus the chunk, a global layer to the prefix plus
the chunk), then decoded one token per step for the whole batch. The decode step can be compiled
(`compile=True`): every step has the same shapes and the caches advance in place, so it is compiled once
per machine for a model layout, batch and cache bucket (gemmakit.compiled) and loaded in later processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from gemmakit.cache import make_cache
from gemmakit.compiled import compiled_step, decode_step
from gemmakit.model import Gemma
from gemmakit.quant import fuse_decode
from gemmakit.sample import check_sampling, repetition_penalty, sample
from gemmakit.vision import embed_with_images

_KV_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_length(model: Gemma, prompt_len: int, max_new_tokens: int) -> None:
    """A prompt plus its new tokens must fit the model's context: say the limit, do not run past it."""
    limit = model.config.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds "
                         f"{model.config.name}'s context length of {limit} tokens")


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """tokens [B, L] (padding id 0) and positions [B, L] (-1 on padding) for prompts right-aligned."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    positions = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            positions[i, longest - len(p):] = torch.arange(len(p))
    return tokens.to(device), positions.to(device)


COMPILE_BUCKET = 512  # cache lengths are multiples of this when compiling: fewer distinct shapes

# -- prefill: a prompt fed through the cache in chunks ----------------------------------------------------

PREFILL_CHUNK = 512  # tokens per chunk at most: big enough that the products run at full speed
PREFILL_BUDGET = 256 << 20  # bytes: what one chunk's attention scores and masks may take at most


def _score_bytes(config, batch: int, length: int, dtype_bytes: int = 4) -> int:
    """Bytes that attention needs per query token against `length` keys: the boolean mask and its
    intermediates ([B, 1, C, K], ~2 bytes an entry), the float mask torch's flash kernel makes of it (in
    the compute dtype, `dtype_bytes`) and, where scores are written out (Gemma 2's soft-cap), the fp32
    scores [B, H, C, K] with the copies the soft-cap, mask and softmax make (~3)."""
    per_key = 2 + dtype_bytes + (3 * 4 * config.n_heads if config.attn_softcap is not None else 0)
    return batch * length * per_key


def prefill_chunk(config, batch: int, length: int) -> int:
    """The default chunk for prefilling `batch` prompts of up to `length` tokens: PREFILL_CHUNK, or fewer
    (a multiple of 64, at least 64) when the last chunk's scores against all `length` keys would pass
    PREFILL_BUDGET. Gemma 3 270M at 32K: 512 (scores go through the flash kernel); Gemma 2 27B at 8K: 64
    (its soft-cap writes the scores out: 32 heads x 8K keys x 4 bytes, three times, per query token)."""
    fit = PREFILL_BUDGET // max(1, _score_bytes(config, batch, length))
    return max(64, min(PREFILL_CHUNK, fit // 64 * 64))


def chunk_ends(length: int, chunk: int, image_mask: Tensor | None = None, start: int = 0) -> list[int]:
    """Where chunks of at most `chunk` columns from `start` to `length` end, never inside an image.

    image_mask [B, length] (True on image soft tokens, any row): a chunk may not end on a soft token,
    since an image's tokens attend to each other and must be fed in one pass. A cut that would is moved
    back to just before the image; an image longer than the chunk gets a longer chunk of its own.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    blocked = None
    if image_mask is not None and bool(image_mask.any()):
        blocked = image_mask.any(0).tolist()  # column i: some row has a soft token there
    ends = []
    while start < length:
        end = min(start + chunk, length)
        if blocked is not None and end < length and blocked[end - 1]:
            back = next((e for e in range(end - 1, start, -1) if not blocked[e - 1]), None)
            end = back if back is not None else next(e for e in range(end + 1, length + 1)
                                                     if e == length or not blocked[e - 1])
        ends.append(end)
        start = end
    return ends


def prefill_hidden(model: Gemma, tokens: Tensor | None, positions: Tensor, cache: list, *,
                   chunk: int | None = None, embeds: Tensor | None = None,
                   image_mask: Tensor | None = None) -> Tensor:
    """Feed prompts through `cache` in chunks; the final hidden state of the last column [B, d_model].

    tokens [B, T] (or embeds [B, T, d_model]) and positions [B, T] (-1 on left padding), as Gemma.hidden
    takes them; image_mask [B, T] on image soft tokens. Chunks of `chunk` columns (default: prefill_chunk)
    end outside images (chunk_ends). Each chunk attends through the cache: a local layer to its window
    plus the chunk, a global layer to the cached prefix plus the chunk, so no layer ever scores the whole
    prompt against itself. Equal to one pass over the whole prompt (fp32: within 1e-5).
    """
    x = tokens if embeds is None else embeds
    b, t = x.shape[:2]
    if t == 0:
        raise ValueError("nothing to prefill: the prompt is empty")
    if chunk is None:
        chunk = prefill_chunk(model.config, b, int(positions.max()) + 1)
    h, start = None, 0
    for end in chunk_ends(t, chunk, image_mask):
        part = slice(start, end)
        h = model.hidden(None if embeds is not None else tokens[:, part], positions[:, part], cache,
                         embeds=None if embeds is None else embeds[:, part],
                         image_mask=None if image_mask is None else image_mask[:, part])[:, -1]
        start = end
    return h


def prefill(model: Gemma, tokens: Tensor | None, positions: Tensor, cache: list, *, chunk: int | None = None,
            embeds: Tensor | None = None, image_mask: Tensor | None = None) -> Tensor:
    """prefill_hidden, then the LM head on the last column: logits [B, V] in fp32 (as the decode step's)."""
    h = prefill_hidden(model, tokens, positions, cache, chunk=chunk, embeds=embeds, image_mask=image_mask)
    return model.logits(h).float()


def decode_fn(model: Gemma, compile: bool, cache: list) -> Callable[[Tensor, Tensor, list], Tensor]:
    """The decode step (token, pos, cache) -> logits [B, V] fp32 for caches shaped like `cache`: eager,
    or compiled (gemmakit.compiled: a package built once per machine, then loaded; eager if it cannot
    be built). Compiling swaps in the fused decode products first (quant.fuse_decode, in place)."""
    if compile:
        fuse_decode(model)  # the compiled step needs the fused matrix-vector products (a no-op the second time)
        example = torch.zeros(cache[0].k.shape[0], 1, dtype=torch.long, device=cache[0].k.device)
        step = compiled_step(model, cache, example, example)
        if step is not None:
            return step
    return lambda token, pos, cache: decode_step(model, token, pos, cache)


def generate(model: Gemma, prompts: list[list[int]], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             kv_dtype: torch.dtype | str | None = None, embeds: Tensor | None = None, images: Tensor | None = None,
             compile: bool = False, chunk: int | None = None) -> Iterator[list[int | None]]:
    """Yield, once per decode step, one new token id per prompt (None once that sequence has stopped).

    A stop id is yielded once, then None for that sequence; the generator ends when every sequence has
    stopped or produced `max_new_tokens`. `embeds` [B, L, d_model] replaces the token embeddings of
    the (left-padded) prompts. `images` [N, 3, S, S] (gemmakit.image.preprocess, concatenated) fill
    the prompts' image soft-token placeholders in order (see gemmakit.vision). `kv_dtype` defaults to the
    model's dtype. Sampling uses `seed` through its own generator: the same seed gives the same tokens.
    `repetition_penalty` (CTRL's, as transformers applies it; see sample.repetition_penalty) counts every
    id of the prompt and of the text generated so far, also when decoding greedily.
    `compile`: decode with the compiled step (see decode_fn and gemmakit.compiled; the first use of a
    model layout, batch and cache bucket on a machine builds it, with a note on stderr); the tokens and
    logits equal eager decoding's (fp32 logits within 1e-5). The prefill always runs eagerly, in chunks of
    `chunk` columns (default: prefill_chunk) through the cache (see prefill_hidden); with more than one
    new token (and no embeds or images), the prompts' last column goes through the decode step instead.

    Arguments are checked when this is called, before any model work: ValueError names the first bad
    one (empty prompt, a setting out of range, a prompt that does not fit the context, ...).
    """
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: a prompt needs at least one token (e.g. <bos>)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    for p in prompts:
        check_length(model, len(p), max_new_tokens)
    vocab = model.config.vocab_size
    if bad := [t for p in prompts for t in p if not 0 <= t < vocab]:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
    if isinstance(kv_dtype, str):
        try:
            kv_dtype = _KV_DTYPES[kv_dtype]
        except KeyError:
            raise ValueError(f"unknown kv dtype {kv_dtype!r}; use one of {', '.join(_KV_DTYPES)}") from None
    if images is not None and embeds is not None:
        raise ValueError("pass images or embeds, not both")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    penalty = None if repetition_penalty in (None, 1.0) else repetition_penalty
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    # A plain function that returns the generator: the checks above run at the call, not at the first
    # next(), so a caller (the CLI) can validate before it prints anything.
    return _steps(model, prompts, max_new_tokens, stop_ids, pick, penalty, seed, kv_dtype, embeds, images, compile,
                  chunk)


@torch.inference_mode()
def _steps(model: Gemma, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int], pick: dict,
           penalty: float | None, seed: int | None, kv_dtype: torch.dtype | None, embeds: Tensor | None,
           images: Tensor | None, compile: bool, chunk: int | None) -> Iterator[list[int | None]]:
    device = model.model.embed_tokens.weight.device
    tokens, positions = left_pad(prompts, device)
    b, longest = tokens.shape
    image_mask = None
    if images is not None or (embeds is None and model.config.image_token_id is not None):
        # Images (or a vision model's prompts): soft tokens spliced in, attending bidirectionally per image.
        embeds, image_mask = embed_with_images(model, tokens, images)
    if embeds is not None and embeds.shape[:2] != (b, longest):
        raise ValueError(f"embeds of shape {tuple(embeds.shape)} do not match the padded prompts {(b, longest)}")
    # Every sequence advances one slot per step, so the caches need the longest prompt + the new tokens
    # (minus the last token, which is never fed back).
    slots = longest + max_new_tokens - 1
    if compile:  # round up so that other prompt lengths reuse the compiled step (masks hide the extra slots)
        slots = min(-(-slots // COMPILE_BUCKET) * COMPILE_BUCKET, model.config.max_seq_len)
    cache = make_cache(model.config, b, slots, kv_dtype or model.dtype, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    # Made (a compiled one loaded or built) before the first token is yielded, so that its note on stderr
    # comes before any text; a single new token needs no step.
    step = decode_fn(model, compile, cache) if max_new_tokens > 1 else None
    if step is not None and embeds is None:
        # Prefill all but the last column in chunks; the last column (left padding puts every prompt's
        # end there) goes through the decode step, whose LM head is the fast one (compiled, it may use a
        # layout that eager products are slow on: see quant.Int8Linear).
        if longest > 1:
            prefill_hidden(model, tokens[:, :-1], positions[:, :-1], cache, chunk=chunk)
        logits = step(tokens[:, -1:], positions[:, -1:], cache)
    else:  # prefill in chunks, the LM head only on the last column
        logits = prefill(model, None if embeds is not None else tokens, positions, cache, chunk=chunk,
                         embeds=embeds, image_mask=image_mask)
    seen = None
    if penalty is not None:  # ids present so far per sequence (the prompt's, not the padding's)
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
    next_pos = torch.tensor([len(p) for p in prompts], device=device)[:, None]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)
    for i in range(max_new_tokens):
        if seen is not None:
            logits = repetition_penalty(logits, seen, penalty)
        new = sample(logits, generator=generator, **pick)
        out: list[int | None] = [None if d else t for t, d in zip(new.tolist(), done.tolist())]
        yield out
        done |= torch.isin(new, stops)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        if seen is not None:
            seen[rows, new] = True
        # Finished sequences keep stepping (their outputs are ignored) so the batch keeps one shape.
        logits = step(new[:, None], next_pos, cache)
        next_pos = next_pos + 1


# -- text: ids -> text with stop strings, as the CLI (and a server) show it ------------------------------

@dataclass
class Completion:
    """One prompt's generated text and what it took. Finish reasons are OpenAI's terms."""

    text: str  # without the stop id's text or the stop string
    finish_reason: str  # "stop" (a stop id or a stop string ended it) or "length" (max_new_tokens reached)
    prompt_tokens: int  # ids fed in, <bos> and image soft tokens included
    completion_tokens: int  # ids generated: a final stop id counts, nothing after a stop string does
    prefill_seconds: float  # from the start to the first new token (shared by a batch)
    decode_seconds: float  # from the first new token to this sequence's last


@dataclass
class TextChunk:
    """New text of prompt `index`, safe to show now; the prompt's last chunk carries its Completion."""

    index: int
    text: str
    completion: Completion | None = None


def check_stop(stop: str | Sequence[str]) -> tuple[str, ...]:
    """Stop strings as a tuple (one string is one stop string, as in OpenAI's `stop`); an empty one is a
    ValueError (it would match before any text)."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"a stop string must be a non-empty string, got {stop!r}")
    return stop


def _partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that some stop string starts with (and is longer than)."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])),
               default=0)


class TextStream:
    """One sequence's ids, pushed one at a time, as text that is safe to show.

    Ends at a stop id (its text is not shown) or at the first stop string (neither it nor anything after
    it is shown). While the decoded text ends in what may be the start of a stop string, only that tail
    is held back; a multi-byte character is shown once complete (the tokenizer's stream()). The
    tokenizer is duck-typed: `stream()` (push(id) -> str, flush() -> str) and `stop_ids`.
    """

    def __init__(self, tokenizer, stop: str | Sequence[str] = (), stop_ids: Sequence[int] | None = None) -> None:
        self.stop = check_stop(stop)
        self.stop_ids = frozenset(tokenizer.stop_ids if stop_ids is None else stop_ids)
        self.text = ""  # shown so far
        self.tokens = 0  # ids pushed
        self.finish_reason: str | None = None
        self._decoder = tokenizer.stream()
        self._held = ""  # decoded, not shown yet

    def push(self, token_id: int) -> str:
        """Text to show after `token_id` ("" while held back); sets finish_reason at a stop."""
        if self.finish_reason is not None:
            raise ValueError("this text stream has finished")
        self.tokens += 1
        if token_id in self.stop_ids:
            return self.finish("stop")
        self._held += self._decoder.push(token_id)
        return self._release(None)

    def finish(self, reason: str = "length") -> str:
        """End the stream with `reason` unless it has ended: the rest of the text, held tail included."""
        if self.finish_reason is not None:
            return ""
        self._held += self._decoder.flush()
        return self._release(reason)

    def _release(self, reason: str | None) -> str:
        # A stop string cannot begin in text already shown (its start would have been held back), so
        # only the held text is searched.
        cut = min((i for s in self.stop if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self._held, self.finish_reason = self._held[:cut], "", "stop"
        elif reason is not None:
            out, self._held, self.finish_reason = self._held, "", reason
        else:
            keep = len(self._held) - _partial_stop(self._held, self.stop)
            out, self._held = self._held[:keep], self._held[keep:]
        self.text += out
        return out


def stream_text(model: Gemma, tokenizer, prompts: list[list[int]], max_new_tokens: int, *,
                stop: str | Sequence[str] = (), **sampling) -> Iterator[TextChunk]:
    """Generate from token-id `prompts` as one batch and yield text chunks as they become safe to show.

    Each prompt gets chunks in order (`index` says whose), ending with one that carries its Completion;
    generation stops once every prompt has finished (a stop id, a stop string or `max_new_tokens`).
    `tokenizer`: duck-typed, `stream()` and `stop_ids` (see TextStream). `sampling`: the keyword
    arguments of `generate` (temperature, top_k, top_p, min_p, repetition_penalty, seed, images, ...).
    Raises ValueError here, before any model work, for a bad argument.
    """
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    steps = generate(model, prompts, max_new_tokens, stop_ids=tokenizer.stop_ids, **sampling)
    return _chunks(steps, streams, [len(p) for p in prompts])


def _chunks(steps: Iterator[list[int | None]], streams: list[TextStream],
            prompt_lens: list[int]) -> Iterator[TextChunk]:
    start = time.perf_counter()
    first = now = start

    def last(i: int, text: str) -> TextChunk:
        s = streams[i]
        return TextChunk(i, text, Completion(s.text, s.finish_reason, prompt_lens[i], s.tokens, first - start,
                                             now - first))

    try:
        for n, step in enumerate(steps):
            now = time.perf_counter()
            if n == 0:
                first = now
            for i, token in enumerate(step):
                if token is None or streams[i].finish_reason is not None:
                    continue
                text = streams[i].push(token)
                if streams[i].finish_reason is not None:
                    yield last(i, text)
                elif text:
                    yield TextChunk(i, text)
            if all(s.finish_reason is not None for s in streams):
                return  # every sequence stopped (a stop string does not stop the engine): stop decoding
    finally:
        steps.close()
    for i, s in enumerate(streams):
        if s.finish_reason is None:
            yield last(i, s.finish("length"))


def generate_text(model: Gemma, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 64, *,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                  stop: str | Sequence[str] = (), **kwargs) -> str | list[str]:
    """The text generated after `prompt` (a list of prompts: a list of texts, generated as one batch).

    Each prompt is encoded with `tokenizer.encode` (which adds `<bos>`); generation ends at a stop id, at
    the first of the `stop` strings (not included in the text) or after `max_new_tokens`. Greedy unless
    `temperature` > 0; the other settings as in `generate` (whose other keyword arguments pass through).
    """
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = [tokenizer.encode(t) for t in texts]
    out = [""] * len(ids)
    for chunk in stream_text(model, tokenizer, ids, max_new_tokens, stop=stop, temperature=temperature,
                             top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                             seed=seed, **kwargs):
        if chunk.completion is not None:
            out[chunk.index] = chunk.completion.text
    return out[0] if isinstance(prompt, str) else out


# -- memory planning ---------------------------------------------------------------------------------

# Bytes per cached value. int8 is for planning only (the engine stores fp32/bf16): one byte per value
# plus one bf16 scale per token and head, as an int8 KV cache would need.
KV_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0}


def kv_bytes_per_value(kv_dtype: str, head_dim: int) -> float:
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"unknown kv dtype {kv_dtype!r}; use one of {', '.join(KV_BYTES)}")
    return KV_BYTES[kv_dtype] + (2.0 / head_dim if kv_dtype == "int8" else 0.0)


def memory_plan(config, context: int, batch: int = 1, kv_dtype: str = "bf16") -> dict:
    """Weight and KV-cache bytes for serving `batch` sequences of `context` tokens (nothing allocated)."""
    from gemmakit.cache import cache_bytes
    from gemmakit.quant import weight_bytes

    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got {context} and {batch}")
    if context > config.max_seq_len:
        raise ValueError(f"context of {context} tokens exceeds {config.name}'s context length of "
                         f"{config.max_seq_len} tokens")
    bpv = kv_bytes_per_value(kv_dtype, config.head_dim)
    vision = sum(v for k, v in config.param_counts().items() if k in ("vision", "projector"))
    weights = {"fp32": weight_bytes(config, None, 4), "bf16": weight_bytes(config, None, 2),
               "int8": weight_bytes(config, "int8", 2), "int4": weight_bytes(config, "int4", 2)}
    as_built = cache_bytes(config, batch, context, bpv)
    global_only = cache_bytes(config, batch, context, bpv, global_only=True)
    return dict(model=config.name, context=context, batch=batch, kv_dtype=kv_dtype, weights=weights,
                vision_bf16=2 * vision, kv_as_built=as_built, kv_global_only=global_only,
                prefill_chunk=min(context, prefill_chunk(config, batch, context)),
                prefill_fp32=prefill_bytes(config, context, batch, 4, bpv),
                prefill_bf16=prefill_bytes(config, context, batch, 2, bpv))


def prefill_bytes(config, context: int, batch: int = 1, dtype_bytes: int = 2, kv_bytes: float = 2.0) -> int:
    """Working memory of prefilling `batch` prompts of `context` tokens in chunks (prefill_chunk), above
    the weights and the KV cache: the last chunk's activations, its attention masks (and Gemma 2's
    written-out scores) against all `context` keys, a local layer's window ++ chunk, the cast of the cached
    prefix when the KV dtype is not the compute dtype (`dtype_bytes`), the last token's fp32 logits, and
    for a vision model the embedded prompt. An estimate, not counting the vision tower's activations:
    measured on Gemma 3 270M at 32K (the peak resident memory of the last chunks above what the process
    held before), 122 MiB in fp32 (estimate 133) and 69 MiB in bf16 (estimate 84)."""
    c, a = min(context, prefill_chunk(config, batch, context)), dtype_bytes
    d, hd, h, kv = config.d_model, config.head_dim, config.n_heads, config.n_kv_heads
    # Residual stream and norms, q/k/v and their rotated copies, attention output, the MLP's four tensors.
    activations = batch * c * a * (6 * d + 3 * h * hd + 4 * kv * hd + 4 * config.intermediate_size)
    window = min(config.sliding_window or 0, context)
    ring = 2 * batch * kv * (window + c) * hd * a if window else 0
    cast = 2 * batch * kv * context * hd * a if kv_bytes != a else 0
    logits = 2 * batch * config.vocab_size * 4
    embeds = batch * context * d * a if config.vision is not None else 0
    return int(activations + c * _score_bytes(config, batch, context, a) + ring + cast + logits + embeds)


def format_plan(plan: dict, fmt: Callable[[float], str]) -> str:
    w, built, glob = plan["weights"], plan["kv_as_built"], plan["kv_global_only"]
    lines = [f"memory for {plan['batch']} x {plan['context']:,} tokens, KV cache in {plan['kv_dtype']}"]
    lines.append("  text weights  " + ", ".join(f"{k} {fmt(v)}" for k, v in w.items()))
    if plan["vision_bf16"]:
        lines.append(f"  vision tower  bf16 {fmt(plan['vision_bf16'])}")
    lines.append(f"  KV cache as built (local layers keep their window)  {fmt(built)}"
                 f"  = {built / w['bf16']:.1%} of the bf16 text weights")
    lines.append(f"  KV cache if every layer were global                 {fmt(glob)}"
                 f"  = {glob / w['bf16']:.1%} of the bf16 text weights")
    lines.append(f"  as built / global-only  {built / glob:.3f}  ({glob / built:.1f}x smaller)")
    lines.append(f"  prefill working memory (chunks of {plan['prefill_chunk']:,} tokens)  "
                 f"fp32 {fmt(plan['prefill_fp32'])}, bf16 {fmt(plan['prefill_bf16'])}")
    return "\n".join(lines)
