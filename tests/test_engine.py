import pytest
import torch

from gemmakit.config import get_config
from gemmakit.engine import generate
from gemmakit.model import build


def tiny(name="gemma3-270m", **kw):
    """A tiny random model of the preset's family (window 6 so the ring buffers wrap)."""
    cfg = get_config(name)
    cfg = cfg.replace(name=f"tiny-{name}", vocab_size=97, d_model=48, n_heads=4, n_kv_heads=2, head_dim=16,
                      intermediate_size=96, n_layers=len(cfg.layer_types[:6]), layer_types=cfg.layer_types[:6],
                      max_seq_len=64, sliding_window=6 if cfg.sliding_window else None, **kw)
    model = build(cfg, "cpu")
    g = torch.Generator().manual_seed(0)
    model.init_weights(std=0.02, generator=g)
    # Large projections and nonzero norms: with small ones a tied-embedding model mostly echoes its
    # last input token, and greedy outputs would be too uniform to tell a wrong cache from a right one.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0, 0.3, generator=g)
            elif "proj" in n:
                p.normal_(0, 0.5, generator=g)
    return model.eval()


def reference_greedy(model, prompt, n):
    """Greedy decoding the slow way: a full forward over the whole sequence for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def run(model, prompts, n, **kw):
    steps = list(generate(model, prompts, n, **kw))
    return [[s[i] for s in steps] for i in range(len(prompts))]


PROMPTS = [[2, 5, 9, 14, 3, 7, 7, 1, 40, 41, 42], [2, 60], [2, 11, 12, 13, 80, 81]]


@pytest.mark.parametrize("name", ["gemma-2b", "gemma2-2b", "gemma3-270m"])
def test_greedy_equals_full_forward_and_batched_equals_unbatched(name):
    model = tiny(name)
    n = 20  # 11 + 20 > 3 windows of 6: the local caches wrap several times
    refs = [reference_greedy(model, p, n) for p in PROMPTS]
    assert all(len(set(r)) >= 4 for r in refs)  # the model does not just repeat one token
    assert [run(model, [p], n)[0] for p in PROMPTS] == refs
    assert run(model, PROMPTS, n) == refs


def test_seeded_sampling_is_repeatable():
    model = tiny()
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01)
    a = run(model, PROMPTS, 15, seed=123, **kw)
    assert a == run(model, PROMPTS, 15, seed=123, **kw)
    assert a != run(model, PROMPTS, 15, seed=124, **kw)


def test_each_sequence_stops_on_its_own():
    model = tiny()
    refs = [reference_greedy(model, p, 10) for p in PROMPTS]
    k0 = next(k for k in range(2, 10) if refs[0][k] not in refs[0][:k])
    stop = refs[0][k0]  # a token the first sequence first emits at step k0 >= 2
    out = run(model, PROMPTS, 10, stop_ids=[stop, 96])
    for ref, got in zip(refs, out):
        k = ref.index(stop) if stop in ref else None
        if k is None:
            assert got == ref
        else:  # the stop token is yielded once, then None
            assert got[:k + 1] == ref[:k + 1] and all(t is None for t in got[k + 1:])
    assert out[0][k0] == stop and out[0][k0 + 1] is None
    # When every sequence has stopped the generator ends early.
    steps = list(generate(model, [PROMPTS[0]], 10, stop_ids=[stop]))
    assert len(steps) == k0 + 1


def test_context_limit_is_an_error_naming_it():
    model = tiny()
    with pytest.raises(ValueError, match="context length of 64"):
        next(generate(model, [[2] * 60], 5))
    assert len(list(generate(model, [[2] * 60], 4))) == 4
    with pytest.raises(ValueError, match="vocabulary"):
        next(generate(model, [[2, 500]], 2))
    with pytest.raises(ValueError, match="empty prompt"):
        next(generate(model, [[]], 2))


def test_embeds_replace_token_embeddings():
    model = tiny()
    prompt = PROMPTS[0]
    embeds = model.embed(torch.tensor([prompt]))
    assert run(model, [prompt], 6, embeds=embeds) == run(model, [prompt], 6)


def test_memory_plan_matches_the_gemma3_report():
    from gemmakit.engine import memory_plan

    # Report section 5.2: at 32K context a global-only cache costs ~60% memory overhead, the 5:1 local
    # pattern with a 1024 window less than 15% (gemma3-4b, bf16 weights and cache).
    plan = memory_plan(get_config("gemma3-4b"), 32768)
    bf16 = plan["weights"]["bf16"]
    assert 0.55 < plan["kv_global_only"] / bf16 < 0.65
    assert plan["kv_as_built"] / bf16 < 0.15
    p27 = memory_plan(get_config("gemma3-27b"), 32768, batch=2, kv_dtype="fp32")
    assert p27["kv_as_built"] == 2 * 2 * (10 * 32768 + 52 * 1024) * 16 * 128 * 4
    assert p27["weights"]["bf16"] == 2 * (1_409_286_144 + 25_599_716_096)
    with pytest.raises(ValueError, match="context length of 131072"):
        memory_plan(get_config("gemma3-27b"), 131073)
    with pytest.raises(ValueError, match="kv dtype"):
        memory_plan(get_config("gemma3-27b"), 1024, kv_dtype="fp8")


def test_info_prints_the_plan(capsys):
    from gemmakit.cli import main

    assert main(["info", "gemma3-27b", "--context", "32768", "--batch", "1", "--kv-dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "memory for 1 x 32,768 tokens, KV cache in bf16" in out
    assert "2.9 GiB" in out and "15.5 GiB" in out and "5.3x smaller" in out


@pytest.fixture(scope="module")
def compile_home(tmp_path_factory):
    """gemmakit's cache (where compiled steps are kept) in a temporary folder shared by this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMAKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.mark.slow
def test_compiled_decode_equals_eager(compile_home):
    # Greedy tokens equal; the logits of every step within 1e-5 (fp32) from the same cache states. Gemma 2:
    # soft-caps, local and global layers (Gemma 3 in the test below); each build costs most of a minute.
    from gemmakit.cache import make_cache
    from gemmakit.engine import decode_fn

    model = tiny("gemma2-2b")
    assert run(model, PROMPTS, 10, compile=True) == run(model, PROMPTS, 10)
    caches = [make_cache(model.config, 3, 64) for _ in range(2)]  # batch 3, as above: the same package
    steps = [decode_fn(model, compile, c) for compile, c in zip((True, False), caches)]
    token = torch.tensor([[5], [17], [60]])
    with torch.inference_mode():
        for i in range(8):
            compiled, eager = (step(token, torch.full((3, 1), i), c) for step, c in zip(steps, caches))
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
            token = eager.argmax(-1, keepdim=True)


def test_package_key_changes_with_what_a_compiled_step_specializes_on():
    from gemmakit.cache import make_cache
    from gemmakit.compiled import package_key
    from gemmakit.quant import quantize

    a, b = tiny(), tiny()
    cache = make_cache(a.config, 1, 64)
    key = package_key(b, cache)
    assert package_key(a, cache) == key  # same config, modules and weight layouts: one package serves both
    assert package_key(a, make_cache(a.config, 2, 64)) != key  # another batch
    assert package_key(a, make_cache(a.config, 1, 32)) != key  # another cache length
    assert package_key(a, make_cache(a.config, 1, 64, torch.bfloat16)) != key  # another KV dtype
    other = tiny("gemma2-2b")
    assert package_key(other, make_cache(other.config, 1, 64)) != key
    torch.set_num_threads(torch.get_num_threads() + 1)  # compiled into the kernels
    try:
        assert package_key(a, cache) != key
    finally:
        torch.set_num_threads(torch.get_num_threads() - 1)
    b.to(torch.bfloat16)
    assert package_key(b, cache) != key
    key = package_key(b, cache)
    quantize(b, "int8")
    assert package_key(b, cache) != key


@pytest.mark.slow
def test_compiled_decode_follows_a_model_changed_in_place(compile_home):
    # One package per layout, the weights passed at every step: a model of the same layout with other
    # weights must read its own, and a swap of the same model object (quantized, bf16) a new package.
    from gemmakit.quant import quantize

    model = tiny()
    assert run(model, PROMPTS, 6, compile=True) == run(model, PROMPTS, 6)
    other = tiny()  # same layout, so the same package, but other weights: it must read its own
    with torch.no_grad():
        other.model.embed_tokens.weight.copy_(other.model.embed_tokens.weight.roll(1, dims=0))
    assert run(other, PROMPTS, 6, compile=True) == run(other, PROMPTS, 6) != run(model, PROMPTS, 6)
    quantize(model, "int8")
    assert run(model, PROMPTS, 6, compile=True) == run(model, PROMPTS, 6)
    model = tiny().to(torch.bfloat16)
    assert run(model, PROMPTS, 6, compile=True) == run(model, PROMPTS, 6)


# -- arguments, repetition penalty ---------------------------------------------------------------------

def test_generate_checks_its_arguments_when_called_not_at_the_first_step():
    # So that a caller (the CLI) can validate before printing anything.
    model = tiny()
    for kw, message in ((dict(max_new_tokens=5, prompts=[[2] * 60]), "context length of 64"),
                        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                        (dict(temperature=-1.0), "temperature must be >= 0"),
                        (dict(top_p=1.5), "top_p must be in"),
                        (dict(top_k=0), "top_k must be >= 1"),
                        (dict(min_p=-0.1), "min_p must be in"),
                        (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0")):
        args = dict(prompts=[[2, 5]], max_new_tokens=4) | kw
        with pytest.raises(ValueError, match=message):
            generate(model, **args)  # no next(): the call itself raises


def reference_penalized_greedy(model, prompt, n, penalty):
    """Greedy with CTRL's penalty over the prompt and the output so far, by full forwards (transformers' rule)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1].float()
            seen = sorted(set(seq))
            x = logits[seen]
            logits[seen] = torch.where(x > 0, x / penalty, x * penalty)
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


def test_repetition_penalty_counts_the_prompt_and_the_output_but_not_the_padding():
    model = tiny()
    refs = [reference_penalized_greedy(model, p, 8, 1.8) for p in PROMPTS]
    plain = run(model, PROMPTS, 8)
    assert refs != plain  # the penalty changes the text
    assert run(model, PROMPTS, 8, repetition_penalty=1.8) == refs  # batched: left padding (id 0) not counted
    assert run(model, PROMPTS, 8, repetition_penalty=1.0) == plain


# -- text level: stop strings, held-back tails, finish reasons, generate_text ---------------------------

class PieceTokenizer:
    """Duck-typed tokenizer for the text layer: id i shows as PIECES[i] (<eos> = 1 shows nothing)."""

    PIECES = ["", "", "", "Hel", "lo", " wo", "rld", "!", "o w", "x", "é"]
    stop_ids = (1,)

    class _Stream:
        def push(self, i):
            return PieceTokenizer.PIECES[i]

        def flush(self):
            return ""

    def stream(self):
        return self._Stream()


def test_text_stream_holds_back_only_what_may_start_a_stop_string():
    from gemmakit.engine import TextStream

    s = TextStream(PieceTokenizer(), stop=["o world", "xyz"])
    assert s.push(3) == "Hel"
    assert s.push(4) == "l"  # "o" may start "o world": held back
    assert s.push(5) == ""  # "o wo" still may
    assert s.push(6) == "" and s.finish_reason == "stop"  # "o world": stop, nothing after it shown
    assert s.text == "Hell" and s.tokens == 4
    with pytest.raises(ValueError, match="finished"):
        s.push(7)

    s = TextStream(PieceTokenizer(), stop=["o world"])
    assert [s.push(i) for i in (3, 4, 5, 7)] == ["Hel", "l", "", "o wo!"]  # "o wo!" cannot become a stop
    assert s.push(4) == "l" and s.finish() == "o" and s.finish_reason == "length"  # a held tail ends shown
    assert s.text == "Hello wo!lo"

    s = TextStream(PieceTokenizer(), stop=["x"])
    assert s.push(3) == "Hel" and s.push(1) == "" and s.finish_reason == "stop" and s.text == "Hel"  # <eos>
    s = TextStream(PieceTokenizer(), stop=["o w", "lo w"])  # "Hello wo": the earliest match wins
    assert [s.push(i) for i in (3, 4, 5)] == ["He", "l", ""] and s.finish_reason == "stop" and s.text == "Hel"
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(PieceTokenizer(), stop=[""])
    assert TextStream(PieceTokenizer(), stop="lo").stop == ("lo",)  # one string: one stop string, as in OpenAI's API


class LetterTokenizer:
    """id i <-> the letter chr(97 + i % 26); <bos> = 2, <eos> = 1."""

    stop_ids = (1,)

    def encode(self, text):
        return [2] + [ord(c) - 97 + 26 for c in text]

    def stream(self):
        tok = self

        class Stream:
            def push(self, i):
                return tok.letters([i])

            def flush(self):
                return ""
        return Stream()

    @staticmethod
    def letters(ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stream_text_stops_each_prompt_at_its_stop_string_and_reports_it():
    from gemmakit.engine import stream_text

    model, tok = tiny(), LetterTokenizer()
    refs = [tok.letters(reference_greedy(model, p, 12)) for p in PROMPTS]
    stop = refs[0][4:6]  # a stop string the first prompt's text reaches at character 4 (or earlier)
    cut = refs[0].index(stop)
    chunks = list(stream_text(model, tok, PROMPTS, 12, stop=[stop]))
    done = {c.index: c.completion for c in chunks if c.completion is not None}
    for i, ref in enumerate(refs):
        text = "".join(c.text for c in chunks if c.index == i)
        assert done[i].text == text
        if stop in ref:
            k = ref.index(stop)
            assert text == ref[:k] and done[i].finish_reason == "stop"
            assert done[i].completion_tokens == k + len(stop)  # the tokens up to the stop's last one
        else:
            assert text == ref and done[i].finish_reason == "length" and done[i].completion_tokens == 12
        assert done[i].prompt_tokens == len(PROMPTS[i])
        assert done[i].prefill_seconds > 0 and done[i].decode_seconds >= 0
    assert done[0].text == refs[0][:cut]


def test_generate_text_returns_text_for_a_prompt_or_a_list_of_prompts():
    import gemmakit
    from gemmakit.engine import generate_text

    assert gemmakit.generate_text is generate_text  # exported from the package
    model, tok = tiny(), LetterTokenizer()
    prompts = ["hello", "ab"]
    refs = [tok.letters(reference_greedy(model, tok.encode(p), 8)) for p in prompts]
    assert generate_text(model, tok, "hello", max_new_tokens=8) == refs[0]
    assert generate_text(model, tok, prompts, max_new_tokens=8) == refs
    stop = refs[1][3:5]
    assert generate_text(model, tok, prompts, max_new_tokens=8, stop=[stop]) == [r.split(stop)[0] for r in refs]
    sampled = generate_text(model, tok, prompts, max_new_tokens=8, temperature=1.0, min_p=0.05, seed=1)
    assert len(sampled) == 2 and all(isinstance(t, str) for t in sampled)
