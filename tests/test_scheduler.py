"""The continuous-batching scheduler (gemmakit.serve.scheduler): exact against engine.generate run alone,
staggered joins, chunked prompts between decode steps, per-request seeds, stops and logprobs, cancel,
prefix reuse (and when the rings forbid it), faults that end one request, fixed memory, threads."""

import threading

import pytest
import torch
from conftest import random_model, tiny_config

from gemmakit.config import VisionConfig
from gemmakit.engine import generate
from gemmakit.serve.scheduler import Event, QueueFull, Request, Scheduler

PROMPTS = [list(range(2, 30)), [2, 5, 6], list(range(2, 60)), [2, 9, 9, 9, 9, 10], [2, 40, 41, 42, 43, 44, 45, 46]]
NEW = [12, 20, 7, 15, 9]


class Tok:
    """Duck-typed tokenizer: id i shows as one letter; `stop_ids` as given."""

    def __init__(self, stop_ids=()):
        self.stop_ids = tuple(stop_ids)

    class _Stream:
        def push(self, i):
            return chr(97 + i % 26)

        def flush(self):
            return ""

    def stream(self):
        return self._Stream()


def alone(model, prompt, n, **kw):
    """engine.generate on this prompt alone (batch 1): the reference."""
    return [s[0] for s in generate(model, [prompt], n, **kw) if s[0] is not None]


class Run:
    """Submits requests and drives step() by hand; events per request id."""

    def __init__(self, scheduler):
        self.s, self.events = scheduler, {}

    def add(self, request):
        box = []
        rid = self.s.submit(request, lambda e: self.events.setdefault(box[0], []).append(e))
        box.append(rid)
        return rid

    def steps(self, n):
        for _ in range(n):
            self.s.step()

    def finish(self, limit=2000):
        for _ in range(limit):
            if not self.s.step():
                return
        raise AssertionError("the scheduler did not finish")

    def tokens(self, rid):
        return [e.token for e in self.events[rid] if e.token is not None]


def staggered(model, scheduler, prompts=PROMPTS, new=NEW, **kw):
    """Submit each prompt three steps after the previous one (others mid-prefill or mid-decode)."""
    run = Run(scheduler)
    ids = []
    for p, n in zip(prompts, new):
        ids.append(run.add(Request(p, n, **kw)))
        run.steps(3)
    run.finish()
    return run, ids


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_continuous_batching_equals_each_prompt_alone(generation):
    model = random_model(tiny_config(generation)).eval()
    # 3 slots for 5 requests: some wait for a slot; chunks of 16: the 58-token prompt takes four steps,
    # interleaved with the others' decoding; window 4: the rings wrap.
    scheduler = Scheduler(model, Tok(), max_slots=3, max_len=96, chunk=16, compile=False)
    run, ids = staggered(model, scheduler)
    for rid, p, n in zip(ids, PROMPTS, NEW):
        assert run.tokens(rid) == alone(model, p, n)
        last = run.events[rid][-1]
        assert last.finish_reason == "length" and last.prompt_tokens == len(p) and last.completion_tokens == n
        assert all(e.finish_reason is None for e in run.events[rid][:-1])
    stats = scheduler.stats()
    assert stats["running"] == stats["queued"] == 0
    assert stats["completion_tokens_total"] == sum(NEW) and stats["requests_total"] == len(PROMPTS)


def test_continuous_batching_in_w8a8_gives_each_prompt_its_logprobs_alone():
    """w8a8 rounds every token's activations, so a batch-dependent difference anywhere would flip roundings.
    Its integer products do not depend on the batch: staggered requests get, bit for bit, the log-probs
    each gets alone in the scheduler."""
    from gemmakit.quant import quantize

    model = quantize(random_model(tiny_config(3)).eval(), "w8a8")

    def logprobs(run, rid):
        return [(e.token, e.logprob, e.top_logprobs) for e in run.events[rid] if e.token is not None]

    batched, ids = staggered(model, Scheduler(model, Tok(), max_slots=3, max_len=96, chunk=16, compile=False),
                             logprobs=3)
    for rid, p, n in zip(ids, PROMPTS, NEW):
        one, [ref] = staggered(model, Scheduler(model, Tok(), max_slots=1, max_len=96, chunk=16, compile=False),
                               [p], [n], logprobs=3)
        assert logprobs(batched, rid) == logprobs(one, ref)


def test_a_long_prompt_is_prefilled_between_the_others_decode_steps():
    model = random_model(tiny_config(2)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=2, max_len=96, chunk=16, compile=False)
    run = Run(scheduler)
    short = run.add(Request(PROMPTS[1], 20))
    run.steps(2)
    long = run.add(Request(PROMPTS[2], 5))  # 58 tokens: four chunks of at most 16
    for i in range(4):
        n = len(run.events[short])
        run.steps(1)
        assert len(run.events[short]) == n + 1  # the running stream got its token at every step
        assert (long in run.events) == (i == 3)  # the long prompt's first token after its last chunk
    assert scheduler.stats()["prefill_tokens_total"] == len(PROMPTS[1]) + len(PROMPTS[2])
    run.finish()
    assert run.tokens(long) == alone(model, PROMPTS[2], 5) and run.tokens(short) == alone(model, PROMPTS[1], 20)


@pytest.mark.slow
def test_compiled_scheduler_is_exact_and_compiles_once(tmp_path, monkeypatch):
    import gemmakit.compiled

    monkeypatch.setenv("GEMMAKIT_HOME", str(tmp_path))
    builds = []
    real_build = gemmakit.compiled._build
    monkeypatch.setattr(gemmakit.compiled, "_build", lambda *a: builds.append(1) or real_build(*a))
    model = random_model(tiny_config(3)).eval()
    refs = [alone(model, p, n) for p, n in zip(PROMPTS, NEW)]
    scheduler = Scheduler(model, Tok(), max_slots=2, max_len=96, chunk=16, compile=True)
    assert scheduler.buckets == [1, 2] and len(builds) == 2  # a step over row 0, and one over rows 0-1
    run, ids = staggered(model, scheduler)
    assert [run.tokens(rid) for rid in ids] == refs
    run, ids = staggered(model, scheduler, PROMPTS[::-1], NEW[::-1])  # joins and leaves in another order
    assert [run.tokens(rid) for rid in ids] == refs[::-1]
    assert len(builds) == 2  # whoever runs: nothing more is compiled


def test_each_request_has_its_own_stops_and_sampling():
    model = random_model(tiny_config(3)).eval()
    ref = alone(model, PROMPTS[0], 12)
    stop = ref[5]  # stops its request at its first occurrence
    sampled = dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed=7)
    scheduler = Scheduler(model, Tok(), max_slots=4, max_len=96, chunk=16, compile=False)
    run = Run(scheduler)
    a = run.add(Request(PROMPTS[0], 12, stop_ids=(stop,)))
    b = run.add(Request(PROMPTS[1], 12, **sampled))
    c = run.add(Request(PROMPTS[3], 12))  # the tokenizer's stop ids: none
    run.finish()
    k = ref.index(stop)
    assert run.tokens(a) == ref[:k + 1] and run.events[a][-1].finish_reason == "stop"
    assert run.events[a][-1].completion_tokens == k + 1  # the stop id counts
    assert run.tokens(b) == alone(model, PROMPTS[1], 12, **sampled)  # its own generator, as generate's
    assert run.tokens(c) == alone(model, PROMPTS[3], 12)


def test_a_seed_gives_the_same_tokens_whatever_runs_beside_it():
    model = random_model(tiny_config(2)).eval()
    req = Request(PROMPTS[4], 15, temperature=1.2, top_p=0.9, seed=123)
    lone = Scheduler(model, Tok(), max_slots=4, max_len=96, compile=False)
    run = Run(lone)
    rid = run.add(req)
    run.finish()
    crowd = Scheduler(model, Tok(), max_slots=4, max_len=96, compile=False)
    run2 = Run(crowd)
    run2.add(Request(PROMPTS[0], 6, temperature=1.0, seed=1))
    run2.add(Request(PROMPTS[2], 6))
    run2.steps(2)
    rid2 = run2.add(req)
    run2.add(Request(PROMPTS[1], 12, temperature=0.7))
    run2.finish()
    assert run.tokens(rid) == run2.tokens(rid2) == alone(model, PROMPTS[4], 15, temperature=1.2, top_p=0.9, seed=123)
    assert len(run.tokens(rid)) == 15


def test_stop_strings_and_logprobs():
    model = random_model(tiny_config(1)).eval()
    ref = alone(model, PROMPTS[0], 10)
    text = "".join(chr(97 + i % 26) for i in ref)
    stop = text[4:6]
    scheduler = Scheduler(model, Tok(), max_slots=2, max_len=96, compile=False)
    run = Run(scheduler)
    rid = run.add(Request(PROMPTS[0], 10, stop=(stop, "zzzz"), logprobs=3))
    run.finish()
    events = run.events[rid]
    cut = text.index(stop)
    assert "".join(e.text for e in events) == text[:cut]
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == len(events) == cut + len(stop)
    # Logprobs: the model's own distribution (log_softmax of the fp32 logits), the chosen id among the top 3.
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for e in events:
            logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1].float(), -1)
            assert e.logprob == pytest.approx(float(logp[e.token]), abs=1e-5)
            assert [i for i, _ in e.top_logprobs] == logp.topk(3).indices.tolist()
            assert e.top_logprobs[0][0] == e.token  # greedy
            seq.append(e.token)


def test_cancel_frees_the_slot_within_one_step():
    model = random_model(tiny_config(3)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=1, max_len=96, compile=False)
    run = Run(scheduler)
    a = run.add(Request(PROMPTS[0], 50))
    b = run.add(Request(PROMPTS[1], 5))  # waits: one slot
    q = run.add(Request(PROMPTS[3], 5))
    run.steps(3)
    assert scheduler.stats()["running"] == 1 and scheduler.stats()["queued"] == 2
    scheduler.cancel(a)
    scheduler.cancel(q)  # a queued request
    run.steps(1)
    assert run.events[a][-1] == Event("", None, finish_reason="cancelled", prompt_tokens=len(PROMPTS[0]),
                                      completion_tokens=len(run.events[a]) - 1)
    assert run.events[q] == [Event("", None, finish_reason="cancelled", prompt_tokens=len(PROMPTS[3]))]
    assert b in run.events  # in the freed slot at once: prefilled and its first token sampled
    run.finish()
    assert run.tokens(b) == alone(model, PROMPTS[1], 5)
    scheduler.cancel(a)  # finished or unknown ids are ignored
    scheduler.cancel(12345)
    assert not scheduler.step()


def conversation(model, scheduler, first, follow):
    """Turn 1, then turn 2 = turn 1's prompt + its reply + `follow`; returns (tokens of turn 2, prefilled)."""
    run = Run(scheduler)
    r1 = run.add(Request(first, 6))
    run.finish()
    second = first + run.tokens(r1) + follow
    before = scheduler.stats()["prefill_tokens_total"]
    r2 = run.add(Request(second, 8))
    run.finish()
    assert run.tokens(r2) == alone(model, second, 8)  # the same tokens as a fresh prefill
    return second, scheduler.stats()["prefill_tokens_total"] - before


@pytest.mark.parametrize("generation", [1, 3])
def test_prefix_reuse_prefills_only_the_new_turn(generation):
    model = random_model(tiny_config(generation)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=2, max_len=96, compile=False)
    second, prefilled = conversation(model, scheduler, PROMPTS[0], [70, 71, 72])
    # The reply's last token was never fed back, so it is prefilled with the three new ones.
    assert prefilled == 4 and scheduler.stats()["reused_tokens_total"] == len(second) - 4


def test_prefix_reuse_needs_the_rings_to_hold_the_window():
    model = random_model(tiny_config(3)).eval()  # window 4
    scheduler = Scheduler(model, Tok(), max_slots=1, max_len=96, compile=False)
    run = Run(scheduler)
    run.add(Request(PROMPTS[0], 6))
    run.finish()
    # Shares 20 tokens, but the rings only hold the last 4 of the 33 fed: nothing can be reused.
    prompt = PROMPTS[0][:20] + [90, 91]
    rid = run.add(Request(prompt, 5))
    before = scheduler.stats()["prefill_tokens_total"]
    run.finish()
    assert run.tokens(rid) == alone(model, prompt, 5)
    assert scheduler.stats()["prefill_tokens_total"] - before == len(prompt)
    # A model whose layers are all global reuses the 20 shared tokens.
    model = random_model(tiny_config(1)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=1, max_len=96, compile=False)
    run = Run(scheduler)
    run.add(Request(PROMPTS[0], 6))
    run.finish()
    rid = run.add(Request(prompt, 5))
    run.finish()
    assert run.tokens(rid) == alone(model, prompt, 5)
    assert scheduler.stats()["reused_tokens_total"] == 20


IMG, N_SOFT = 120, 16
SOFT = [108, 118] + [IMG] * N_SOFT + [119, 108]  # one image as the prompt holds it
IMAGE_PROMPT = [2, 80] + SOFT + [81, 82]  # the soft tokens start at index 4


def vision_model(**kw):
    vision = VisionConfig(image_size=32, patch_size=4, hidden_size=24, n_layers=1, n_heads=2, intermediate_size=40,
                          tokens_per_image=N_SOFT)
    return random_model(tiny_config(3).replace(sliding_window=6, vision=vision, image_token_id=IMG, **kw)).eval()


def pixels(seed, size=32):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_a_bad_image_ends_its_request_alone():
    model = vision_model()
    scheduler = Scheduler(model, Tok(), max_slots=2, max_len=96, chunk=8, compile=False)
    run = Run(scheduler)
    good = run.add(Request(IMAGE_PROMPT, 6, images=pixels(0)))
    bad = run.add(Request(IMAGE_PROMPT, 6, images=pixels(0, size=8)))  # not the tower's size
    run.finish()
    assert run.events[bad] == [Event("", None, finish_reason="error", error=run.events[bad][0].error,
                                     prompt_tokens=len(IMAGE_PROMPT))]
    assert run.tokens(good) == alone(model, IMAGE_PROMPT, 6, images=pixels(0))  # chunks of 8 around the image


def test_prefix_reuse_compares_the_images():
    from gemmakit.config import GLOBAL

    model = vision_model(layer_types=(GLOBAL,) * 3)  # no rings: reuse may stop anywhere
    scheduler = Scheduler(model, Tok(), max_slots=1, max_len=96, compile=False)
    run = Run(scheduler)
    first = run.add(Request(IMAGE_PROMPT, 6, images=pixels(0)))
    run.finish()
    turn = IMAGE_PROMPT + run.tokens(first) + [83, 84]
    for seed, prefilled in ((0, 3), (1, len(turn) - 4)):  # the same image: reused; another: cut before it
        before = scheduler.stats()["prefill_tokens_total"]
        rid = run.add(Request(turn, 5, images=pixels(seed)))
        run.finish()
        assert run.tokens(rid) == alone(model, turn, 5, images=pixels(seed))
        assert scheduler.stats()["prefill_tokens_total"] - before == prefilled


def test_submit_checks_the_request():
    model = random_model(tiny_config(3)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=1, max_len=64, max_queue=2, compile=False)
    for request, message in ((Request([], 4), "empty prompt"),
                             (Request([2, 500], 4), "outside the vocabulary"),
                             (Request([2] * 60, 5), "limit of 64 tokens"),
                             (Request([2], 0), "max_new_tokens must be >= 1"),
                             (Request([2], 4, temperature=-1.0), "temperature must be >= 0"),
                             (Request([2], 4, top_p=1.5), "top_p must be in"),
                             (Request([2], 4, logprobs=-1), "logprobs must be"),
                             (Request([2], 4, stop=("",)), "stop string"),
                             (Request([2], 4, images=torch.zeros(1, 3, 32, 32)), "no vision tower")):
        with pytest.raises(ValueError, match=message):
            scheduler.submit(request, print)
    full = Scheduler(model, Tok(), max_len=256, compile=False)
    with pytest.raises(ValueError, match="context length of 256"):
        full.submit(Request([2] * 250, 7), print)
    vision = Scheduler(vision_model(), Tok(), compile=False)
    with pytest.raises(ValueError, match="no image was given"):
        vision.submit(Request([2] + [IMG] * N_SOFT + [5], 4), print)
    with pytest.raises(ValueError, match="need 32 soft tokens"):
        vision.submit(Request([2] + [IMG] * N_SOFT + [5], 4, images=torch.zeros(2, 3, 32, 32)), print)
    scheduler.submit(Request([2], 4), print)
    scheduler.submit(Request([2], 4), print)
    with pytest.raises(QueueFull):
        scheduler.submit(Request([2], 4), print)
    with pytest.raises(ValueError, match="max_len must be between"):
        Scheduler(model, Tok(), max_len=257, compile=False)


def test_memory_is_fixed_whatever_is_served():
    model = random_model(tiny_config(3)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=2, max_len=64, max_queue=40, compile=False)
    storage = [(c.k.data_ptr(), c.v.data_ptr(), c.pos.data_ptr()) for c in scheduler.cache]
    before = scheduler.stats()["cache_bytes"]
    run = Run(scheduler)
    for i in range(12):
        run.add(Request([2, 3 + i, 4 + i], 3))
    run.finish()
    assert len(run.events) == 12 and all(run.events[r][-1].finish_reason == "length" for r in run.events)
    assert [(c.k.data_ptr(), c.v.data_ptr(), c.pos.data_ptr()) for c in scheduler.cache] == storage
    assert scheduler.stats()["cache_bytes"] == before and len(scheduler._slots) == 2 and not scheduler._queue


def test_thread_serves_and_close_drains():
    model = random_model(tiny_config(2)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=2, max_len=96, compile=False)
    scheduler.start()
    events = {k: [] for k in range(4)}
    seen = threading.Event()
    for k, (p, n) in enumerate(zip(PROMPTS[:4], NEW[:4])):
        scheduler.submit(Request(p, n), lambda e, k=k: (events[k].append(e), seen.set()))
        assert k or seen.wait(60)  # the first one is running before the others are submitted
    scheduler.close(drain=True, timeout=120)  # 4 requests, 2 slots: all of them finish
    for k, (p, n) in enumerate(zip(PROMPTS, NEW[:4])):
        assert [e.token for e in events[k]] == alone(model, p, n) and events[k][-1].finish_reason == "length"
    with pytest.raises(RuntimeError, match="shutting down"):
        scheduler.submit(Request([2], 2), print)
    assert not scheduler._thread.is_alive()


def test_close_without_drain_cancels_everything():
    model = random_model(tiny_config(2)).eval()
    scheduler = Scheduler(model, Tok(), max_slots=1, max_len=96, compile=False)
    run = Run(scheduler)
    a, b = run.add(Request(PROMPTS[0], 50)), run.add(Request(PROMPTS[1], 5))
    run.steps(2)
    scheduler.close(drain=False)
    assert run.events[a][-1].finish_reason == "cancelled" and run.events[b][-1].finish_reason == "cancelled"
    assert scheduler.stats()["running"] == scheduler.stats()["queued"] == 0


@pytest.mark.real
def test_real_model_continuous_batching_equals_each_prompt_alone(real_model):
    model, tok = real_model
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
             "def fibonacci(n):", "The three primary colors are"]
    prompts = [tok.encode(t) for t in texts]
    scheduler = Scheduler(model, tok, max_slots=3, max_len=256, chunk=8, compile=False)
    run = Run(scheduler)
    ids = []
    for p in prompts:
        ids.append(run.add(Request(p, 16)))
        run.steps(2)
    run.finish()
    for rid, p in zip(ids, prompts):
        assert run.tokens(rid) == alone(model, p, 16, stop_ids=tok.stop_ids)
