"""Continuous batching over the engine: requests join between decode steps and leave when they stop.

No HTTP here (serve/app.py consumes this). The scheduler owns a fixed number of slots: row r of one KV
cache (engine caches of batch `max_slots` and `max_len` tokens, made once) is slot r. A request takes a
free slot, is prefilled into it in chunks (engine.prefill_hidden's mechanism: a local layer attends to its
window plus the chunk, a global layer to the prefix plus the chunk), then decodes one token per step
together with every other running request, in one call of the engine's decode step (engine.decode_fn).
That step runs over the first rows of the caches, as many as the smallest of the `buckets` (1, 2, 4, ...
up to max_slots) that covers every decoding slot; a row that is empty or still prefilling takes position
-1, which writes nothing and is masked. Compiled, each bucket is one package built when the scheduler is
made (once per machine), so joining and leaving never compile anything, and one running request costs a
batch-1 step. A cache row stores each token at its own position (slot = position; position % window in
a local layer's ring), so every row runs at its own length. Each `step()`:

1. applies cancellations (a running request's slot is free before the next decode step);
2. admits queued requests into free slots, preferring the slot whose cached tokens share the longest
   prefix with the prompt (prefix reuse, below), else one in the lowest rows (least recently used first);
3. prefills up to `chunk` prompt tokens, taken from the admitted prompts in order (a long prompt one
   chunk per step, so the running streams keep decoding between its chunks; chunks never end inside
   an image); a prompt whose prefill completes samples its first token;
4. runs one decode step for every slot that is decoding, samples each one's next token with its own
   settings and generator, and emits one Event per token.

Prefix reuse: a freed slot keeps its cache (the prompt and the tokens fed back after it) until another
request takes it. A new request whose prompt starts with tokens cached in a free slot (the next turn of a
conversation: the previous prompt + reply + the new message) reuses them and prefills only the rest, as
llama.cpp's server does. Reuse needs the same images (compared by content) for the image tokens in the
shared prefix, and a local layer's ring only still holds what the continuation needs when the prompt
continues at (or one token before) the end of what was cached; otherwise the slot is prefilled afresh.

Memory is fixed when the scheduler is made: the caches, `max_slots` rows of `max_len` tokens (`max_len`
default: the model's context, at most DEFAULT_MAX_LEN), and a queue of at most `max_queue` requests;
nothing grows with the number of requests served.

Logprobs are log_softmax of the model's fp32 logits, before temperature and the top-k/top-p/min-p filters:
the model's own distribution, as OpenAI reports it.

Threads: `submit`, `cancel`, `stats` and `close` may be called from any thread; `start` runs `step` in a
loop on a daemon thread, from which every `on_event` callback is called (it must not block for long).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from gemmakit.cache import make_cache
from gemmakit.engine import _KV_DTYPES, TextStream, check_stop, chunk_ends, decode_fn, prefill_chunk
from gemmakit.sample import check_sampling, sample

DEFAULT_MAX_LEN = 4096  # tokens per slot when max_len is not given (and the model's context is longer)
MIN_CHUNK = 64  # a prompt's piece of a step's prefill budget is at least this, unless it is all that is left


@dataclass
class Request:
    prompt: list[int]                  # token ids, <bos> included (already rendered/tokenized)
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None            # own generator per request: same seed -> same tokens, whatever else runs
    stop: tuple[str, ...] = ()         # stop strings (OpenAI `stop`), matched on the detokenized text
    stop_ids: tuple[int, ...] | None = None   # None: the tokenizer's stop ids
    logprobs: int | None = None        # None: none; k >= 0: the chosen token's logprob and the top k
    images: Tensor | None = None       # [N, 3, S, S] preprocessed, for a vision model's image placeholders


@dataclass
class Event:                           # one per generated token, in order; the last one has finish_reason set
    text: str                          # new text safe to show (engine.TextStream semantics; "" while held)
    token: int | None                  # the id generated (None on a final event that carries no token)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error"
    error: str | None = None           # one line, when finish_reason == "error"
    prompt_tokens: int = 0             # set on the last event (usage)
    completion_tokens: int = 0         # set on the last event (usage)


class QueueFull(RuntimeError):
    """`max_queue` requests are waiting for a slot already (the server answers 429)."""


@dataclass
class _Job:
    """A request from submit() until its last event."""

    id: int
    request: Request
    on_event: Callable[[Event], None]
    digests: list[str]  # of the request's images, in order (what prefix reuse compares)
    stream: TextStream
    generator: torch.Generator | None
    done: int = 0  # prompt tokens in the cache (reused or prefilled)
    embeds: Tensor | None = None  # [1, T - reused, d_model]: a prompt with images, after the reused prefix
    image_mask: Tensor | None = None  # [1, T - reused]
    next_token: int | None = None  # sampled, not yet fed back (decoding)
    generated: int = 0


@dataclass
class _Slot:
    row: int
    tokens: list[int] = field(default_factory=list)  # ids whose keys/values the row holds, positions 0..n-1
    images: list[str] = field(default_factory=list)  # digests of the images among `tokens`, in order
    job: _Job | None = None
    freed: int = -1  # step at which it was last freed: the least recently used free slot is taken first


class Scheduler:
    """Continuous batching of Requests over `max_slots` cache slots (see the module docstring).

    model: a Gemma (its dtype is the compute dtype); tokenizer: duck-typed, `stream()` and `stop_ids`
    (gemmakit.tokenizer.Tokenizer). max_len: tokens per slot, prompt + new tokens (default: the model's
    context, at most DEFAULT_MAX_LEN). max_queue: requests waiting for a slot at most. chunk: prompt tokens
    prefilled per step (default: engine.prefill_chunk for max_len; smaller keeps the running streams'
    pauses shorter while a long prompt prefills). compile: run the compiled decode step
    (engine.decode_fn; one package per bucket of rows and max_len, built once per machine, here, before
    the first request: about a minute each for the 270M on 2 cores). kv_dtype: the caches' dtype (torch
    dtype or "bf16"/"fp32"; default the model's).

    The decode step reads every one of its rows' `max_len` cache slots in the global layers, used or
    not: a max_len far above the requests' lengths costs decode speed as well as memory.
    """

    def __init__(self, model, tokenizer, *, max_slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64, chunk: int | None = None, compile: bool = True,
                 kv_dtype=None) -> None:
        config = model.config
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_len is None:
            max_len = min(config.max_seq_len, DEFAULT_MAX_LEN)
        if not 2 <= max_len <= config.max_seq_len:
            raise ValueError(f"max_len must be between 2 and {config.name}'s context length of "
                             f"{config.max_seq_len} tokens, got {max_len}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if isinstance(kv_dtype, str):
            if kv_dtype not in _KV_DTYPES:
                raise ValueError(f"unknown kv dtype {kv_dtype!r}; use one of {', '.join(_KV_DTYPES)}")
            kv_dtype = _KV_DTYPES[kv_dtype]
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_slots, self.max_len, self.max_queue = max_slots, max_len, max_queue
        self.chunk = chunk or prefill_chunk(config, 1, max_len)
        self.device = model.model.embed_tokens.weight.device
        self.cache = make_cache(config, max_slots, max_len, kv_dtype or model.dtype, self.device)
        # One decode step per row count in `buckets` (powers of two, and max_slots), each over the first
        # rows of the caches (views: no copy): a step runs the smallest one that covers every decoding
        # slot, so one running request costs a batch-1 step, not a max_slots one. The fused products of
        # the compiled step are written per row, so a row count is a compiled shape, not a dynamic one.
        self.buckets = sorted({min(1 << i, max_slots) for i in range(max_slots.bit_length() + 1)})
        self._views = {b: [c.rows(0, b) for c in self.cache] for b in self.buckets}
        with torch.inference_mode():
            self._steps_fn = {b: decode_fn(model, compile, self._views[b]) for b in self.buckets}
        self._slots = [_Slot(r) for r in range(max_slots)]
        self._queue: deque[_Job] = deque()
        self._cancel: set[int] = set()
        self._cond = threading.Condition()
        self._next_id = 0
        self._closing = self._stopping = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._totals = dict(requests_total=0, prompt_tokens_total=0, completion_tokens_total=0,
                            prefill_tokens_total=0, reused_tokens_total=0, decode_steps_total=0)

    # -- the public, thread-safe side -------------------------------------------------------------------

    def start(self) -> None:
        """Run `step` in a loop on a daemon thread until `close`."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the scheduler is running already")
            self._thread = threading.Thread(target=self._loop, name="gemmakit-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> int:
        """Queue `request`; its Events go to `on_event` (on the scheduler's thread, in order). Returns its id.

        Raises ValueError naming the problem (empty prompt, an id outside the vocabulary, prompt +
        max_new_tokens past max_len or the context, a sampling setting out of range, bad stop strings,
        images that do not fit the prompt or the model), QueueFull when `max_queue` requests are waiting,
        RuntimeError once the scheduler is closing.
        """
        digests = self._check(request)
        stream = TextStream(self.tokenizer, request.stop,
                            None if request.stop_ids is None else tuple(request.stop_ids))
        generator = None
        if request.seed is not None and request.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting for a slot already (max_queue)")
            job = _Job(self._next_id, request, on_event, digests, stream, generator)
            self._next_id += 1
            self._totals["requests_total"] += 1
            self._queue.append(job)
            self._cond.notify_all()
        return job.id

    def cancel(self, request_id: int) -> None:
        """End a queued or running request: its last Event says "cancelled", its slot is free by the next
        decode step. An unknown or finished id is ignored."""
        with self._cond:
            self._cancel.add(request_id)
            self._cond.notify_all()

    def stats(self) -> dict:
        """Counters for metrics: running, queued, slots, max_len, the totals (requests submitted, prompt
        tokens of admitted requests, completion tokens generated, prompt tokens prefilled and reused from
        a slot's cache, decode steps) and the caches' bytes."""
        with self._cond:
            return dict(running=sum(s.job is not None for s in self._slots), queued=len(self._queue),
                        slots=self.max_slots, max_len=self.max_len, **self._totals,
                        cache_bytes=sum(c.nbytes() for c in self.cache))

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests (submit raises RuntimeError), then, with `drain`, let the running and
        queued ones finish (cancelling what is left after `timeout` seconds), or without it cancel them
        all now; stop the thread. Without a started thread, the draining steps run here."""
        with self._cond:
            self._closing = True
            thread = self._thread
            if not drain:
                self._cancel_all_locked()
            self._stopping = True
            self._cond.notify_all()
        if thread is None:
            while self.step():
                pass
            return
        thread.join(timeout)
        if thread.is_alive():  # the drain took too long: cancel what is left
            with self._cond:
                self._cancel_all_locked()
                self._cond.notify_all()
            thread.join()

    # -- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work_locked():
                    self._cond.wait()
                if self._stopping and not self._has_work_locked():
                    return
            try:
                self.step()
            except Exception as e:  # a bug, not a request's fault: end what runs, keep serving
                print(f"gemmakit: error in the scheduler: {_line(e)}", file=sys.stderr, flush=True)
                self._fail_all(e)

    def _has_work_locked(self) -> bool:
        return bool(self._queue or self._cancel or any(s.job is not None for s in self._slots))

    def _cancel_all_locked(self) -> None:
        self._cancel.update(j.id for j in self._queue)
        self._cancel.update(s.job.id for s in self._slots if s.job is not None)

    def step(self) -> bool:
        """One iteration: cancellations, admissions, up to `chunk` prompt tokens of prefill, one decode step
        for every decoding slot. True while work remains (queued or running requests)."""
        with torch.inference_mode():
            self._steps += 1
            self._apply_cancels()
            self._admit()
            self._prefill()
            self._decode_step()
        with self._cond:
            return self._has_work_locked()

    def _apply_cancels(self) -> None:
        with self._cond:
            ids, self._cancel = self._cancel, set()
            queued = [j for j in self._queue if j.id in ids]
            for j in queued:
                self._queue.remove(j)
        for j in queued:
            self._emit(j, Event("", None, finish_reason="cancelled", prompt_tokens=len(j.request.prompt)))
        for s in self._slots:
            if s.job is not None and s.job.id in ids:
                job = s.job
                self._free(s)
                self._emit(job, Event("", None, finish_reason="cancelled", prompt_tokens=len(job.request.prompt),
                                      completion_tokens=job.generated))

    # -- admission and prefix reuse ---------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if s.job is None]
            with self._cond:
                if not free or not self._queue:
                    return
                job = self._queue.popleft()
            # The slot sharing the longest reusable prefix, if that covers half the prompt (llama.cpp's
            # server picks by this similarity too); else one in the lowest rows (a decode step runs the
            # first rows up to a power of two), least recently used first, so that an unrelated request
            # does not evict a recent conversation for the <bos> they share. Whatever prefix the chosen
            # slot shares is reused.
            reuse = {s.row: self._reusable(s, job) for s in free}
            slot = max(free, key=lambda s: (reuse[s.row], -s.freed))
            if 2 * reuse[slot.row] < len(job.request.prompt):
                slot = min(free, key=lambda s: (s.row.bit_length(), s.freed))
            reuse = reuse[slot.row]
            try:
                self._assign(slot, job, reuse)
            except Exception as e:  # a bad image, say: this request alone ends
                self._forget(slot)
                self._free(slot)
                self._error(job, e)

    def _reusable(self, slot: _Slot, job: _Job) -> int:
        """How many leading prompt tokens `slot`'s cache can serve `job` (see the module docstring)."""
        prompt, cached = job.request.prompt, slot.tokens
        n = 0
        limit = min(len(cached), len(prompt) - 1)  # the last prompt token is always fed: its logits are needed
        while n < limit and cached[n] == prompt[n]:
            n += 1
        image_id = self.config.image_token_id
        if n and image_id is not None and image_id in prompt[:n]:
            per = self.config.vision.tokens_per_image
            images = -(-prompt[:n].count(image_id) // per)  # images (partly) in the shared prefix
            same = next((i for i in range(images) if i >= len(slot.images) or i >= len(job.digests)
                         or slot.images[i] != job.digests[i]), images)
            if same < images:  # cut before the first image that differs
                n = _nth_soft_token(prompt, image_id, same * per)
            while 0 < n < len(prompt) and prompt[n - 1] == image_id and prompt[n] == image_id:
                n -= 1  # never inside an image: all of its tokens are fed in one pass
        if n and not all(c.holds(len(cached), n) for c in self.cache):
            return 0
        return n

    def _assign(self, slot: _Slot, job: _Job, reuse: int) -> None:
        prompt = job.request.prompt
        for c in self.cache:
            c.truncate(slot.row, reuse)
        image_id, kept_images = self.config.image_token_id, 0
        if image_id is not None and self.config.vision is not None:
            kept_images = -(-prompt[:reuse].count(image_id) // self.config.vision.tokens_per_image)
        slot.tokens, slot.images, slot.job = list(prompt[:reuse]), list(job.digests[:kept_images]), job
        job.done = reuse
        with self._cond:
            self._totals["reused_tokens_total"] += reuse
            self._totals["prompt_tokens_total"] += len(prompt)
        if image_id is not None and image_id in prompt[reuse:]:
            from gemmakit.vision import embed_with_images

            tokens = torch.tensor([prompt[reuse:]], device=self.device)
            job.embeds, job.image_mask = embed_with_images(self.model, tokens, job.request.images[kept_images:])
            slot.images.extend(job.digests[kept_images:])

    def _forget(self, slot: _Slot) -> None:
        for c in self.cache:
            c.truncate(slot.row, 0)
        slot.tokens, slot.images = [], []

    def _free(self, slot: _Slot) -> None:
        slot.job, slot.freed = None, self._steps

    # -- prefill ----------------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Up to `chunk` prompt tokens, from the slots being prefilled in the order they were admitted.

        A prompt's last token is not prefilled: it joins the next decode step (`next_token`), whose LM
        head is the fast one (compiled, it may use a layout that eager products are slow on, see
        quant.Int8Linear) and computes the first tokens of every prompt that finished with the others'
        next ones. A prompt whose last token is an image soft token is prefilled to its end instead."""
        budget = self.chunk
        waiting = sorted((s for s in self._slots if s.job is not None and s.job.next_token is None
                          and s.job.generated == 0), key=lambda s: s.job.id)
        for slot in waiting:
            job = slot.job
            left = self._prefill_end(job) - job.done
            if left == 0:  # everything up to the last token is cached (reused): it decodes now
                self._last_prompt_token(job)
                continue
            if budget < self.chunk and budget < min(left, MIN_CHUNK):
                break  # only a sliver left: this prompt starts with a chunk of its own next step
            try:
                budget -= self._prefill_chunk(slot, job, min(budget, left))
            except Exception as e:  # a bad image, say: this request alone ends
                self._forget(slot)
                self._free(slot)
                self._error(job, e)
            if budget <= 0:
                break

    def _prefill_end(self, job: _Job) -> int:
        """Prompt tokens to prefill: all but the last (which the decode step feeds), unless it is an image's."""
        prompt = job.request.prompt
        return len(prompt) if prompt[-1] == self.config.image_token_id else len(prompt) - 1

    def _prefill_chunk(self, slot: _Slot, job: _Job, size: int) -> int:
        """Feed the next chunk (about `size` tokens, never ending inside an image) of `job`'s prompt into its
        slot; after the last one, hand the last prompt token to the decode step (or, for a prompt ending
        in an image, sample the first new token). Returns the tokens fed."""
        prompt, start, stop = job.request.prompt, job.done, self._prefill_end(job)
        base = len(prompt) - (job.embeds.shape[1] if job.embeds is not None else 0)  # where embeds start
        if job.image_mask is not None:
            mask = job.image_mask[:, :stop - base]
            end = base + chunk_ends(stop - base, size, mask, start - base)[0]
        else:
            end = start + size
        positions = torch.arange(start, end, device=self.device)[None]
        rows = [c.rows(slot.row, slot.row + 1) for c in self.cache]
        if job.embeds is not None:
            part = slice(start - base, end - base)
            h = self.model.hidden(None, positions, rows, embeds=job.embeds[:, part], image_mask=job.image_mask[:, part])
        else:
            h = self.model.hidden(torch.tensor([prompt[start:end]], device=self.device), positions, rows)
        slot.tokens.extend(prompt[start:end])
        job.done = end
        with self._cond:
            self._totals["prefill_tokens_total"] += end - start
        if end == len(prompt):
            job.embeds = job.image_mask = None
            self._sampled(slot, self.model.logits(h[:, -1]).float())
        elif end == stop:
            job.embeds = job.image_mask = None
            self._last_prompt_token(job)
        return end - start

    def _last_prompt_token(self, job: _Job) -> None:
        """Hand the prompt's last token to the next decode step (counted as prefilled: it is a prompt token)."""
        job.next_token = job.request.prompt[-1]
        with self._cond:
            self._totals["prefill_tokens_total"] += 1

    # -- decode -----------------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        """One decode step over the first rows (a bucket) covering every decoding slot; the other rows take
        position -1 (nothing written, masked)."""
        decoding = [s for s in self._slots if s.job is not None and s.job.next_token is not None]
        if not decoding:
            return
        rows = next(b for b in self.buckets if b > max(s.row for s in decoding))
        tokens, positions = [0] * rows, [-1] * rows
        for s in decoding:
            tokens[s.row], positions[s.row] = s.job.next_token, len(s.tokens)
        logits = self._steps_fn[rows](torch.tensor(tokens, device=self.device)[:, None],
                                      torch.tensor(positions, device=self.device)[:, None], self._views[rows])
        with self._cond:
            self._totals["decode_steps_total"] += 1
        greedy = None
        if any(s.job.request.temperature == 0 for s in decoding):
            greedy = logits.argmax(-1).tolist()  # one pass and one host sync for every greedy slot
        for s in decoding:
            s.tokens.append(s.job.next_token)
            s.job.next_token = None
            self._sampled(s, logits[s.row:s.row + 1], None if greedy is None else greedy[s.row])

    def _sampled(self, slot: _Slot, logits: Tensor, greedy: int | None = None) -> None:
        """Pick `slot`'s next token from its logits [1, V] (fp32) and emit its Event; free the slot at a stop."""
        job = slot.job
        r = job.request
        if r.temperature == 0:
            token = greedy if greedy is not None else int(logits[0].argmax())
        else:
            token = int(sample(logits, r.temperature, r.top_k, r.top_p, r.min_p, generator=job.generator)[0])
        logprob = top = None
        if r.logprobs is not None:  # the model's distribution: before temperature and filters
            logp = torch.log_softmax(logits[0], dim=-1)
            logprob = float(logp[token])
            top = []
            if r.logprobs > 0:
                values, ids = logp.topk(min(r.logprobs, logp.shape[0]))
                top = list(zip(ids.tolist(), values.tolist()))
        job.generated += 1
        text = job.stream.push(token)
        reason = job.stream.finish_reason
        if reason is None and job.generated >= r.max_new_tokens:
            text += job.stream.finish("length")
            reason = "length"
        with self._cond:
            self._totals["completion_tokens_total"] += 1
        if reason is None:
            job.next_token = token
            self._emit(job, Event(text, token, logprob, top))
            return
        self._free(slot)
        self._emit(job, Event(text, token, logprob, top, reason, prompt_tokens=len(r.prompt),
                              completion_tokens=job.generated))

    # -- events -----------------------------------------------------------------------------------------

    def _emit(self, job: _Job, event: Event) -> None:
        try:
            job.on_event(event)
        except Exception as e:  # the consumer's fault: this request stops, the others go on
            print(f"gemmakit: error in an event callback: {_line(e)}", file=sys.stderr, flush=True)
            if event.finish_reason is None:
                self.cancel(job.id)

    def _error(self, job: _Job, e: BaseException) -> None:
        self._emit(job, Event("", None, finish_reason="error", error=_line(e),
                              prompt_tokens=len(job.request.prompt), completion_tokens=job.generated))

    def _fail_all(self, e: BaseException) -> None:
        for s in self._slots:
            if s.job is not None:
                job = s.job
                self._forget(s)
                self._free(s)
                self._error(job, e)

    # -- checks -----------------------------------------------------------------------------------------

    def _check(self, r: Request) -> list[str]:
        """ValueError naming what makes `r` unable to run; else the digests of its images."""
        config, prompt = self.config, r.prompt
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("empty prompt: a prompt needs at least one token (e.g. <bos>)")
        if not all(isinstance(t, int) and 0 <= t < config.vocab_size for t in prompt):
            bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < config.vocab_size))
            raise ValueError(f"token id {bad!r} is outside the vocabulary of {config.vocab_size}")
        if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {r.max_new_tokens!r}")
        if len(prompt) + r.max_new_tokens > self.max_len:
            limit = (f"{config.name}'s context length of {self.max_len} tokens" if self.max_len == config.max_seq_len
                     else f"the scheduler's limit of {self.max_len} tokens per sequence (max_len)")
            raise ValueError(f"prompt of {len(prompt)} tokens + {r.max_new_tokens} new tokens exceeds {limit}")
        check_sampling(r.temperature, r.top_k, r.top_p, r.min_p)
        if r.seed is not None and not isinstance(r.seed, int):
            raise ValueError(f"seed must be an integer, got {r.seed!r}")
        if r.logprobs is not None and (not isinstance(r.logprobs, int) or r.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0, got {r.logprobs!r}")
        check_stop(r.stop)
        if r.stop_ids is not None and not all(isinstance(t, int) for t in r.stop_ids):
            raise ValueError(f"stop_ids must be token ids, got {r.stop_ids!r}")
        soft = prompt.count(config.image_token_id) if config.image_token_id is not None else 0
        if r.images is None:
            if soft:
                raise ValueError(f"the prompt has {soft} image soft tokens but no image was given")
            return []
        from gemmakit.vision import require_vision

        per = require_vision(config).tokens_per_image  # ValueError for a model without a vision tower
        images = r.images
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor [N, 3, S, S], got {getattr(images, 'shape', type(images))}")
        if soft != images.shape[0] * per:
            raise ValueError(f"{images.shape[0]} image(s) need {images.shape[0] * per} soft tokens in the prompt, "
                             f"it has {soft}")
        return [hashlib.sha256(img.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()
                for img in images]


def _nth_soft_token(prompt: list[int], image_id: int, k: int) -> int:
    """Index of the k-th (from 0) image soft token of `prompt`."""
    seen = -1
    for i, t in enumerate(prompt):
        if t == image_id:
            seen += 1
            if seen == k:
                return i
    return len(prompt)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
