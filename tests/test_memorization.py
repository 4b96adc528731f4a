"""Memorization rates (issue 15 item 5): edit distance, span sampling, counting, a model made to memorize."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab
from gemmakit import engine, weights
from gemmakit.cli import main
from gemmakit.eval.memorization import levenshtein, memorization, sample_spans, wilson_interval
from gemmakit.tokenizer import Tokenizer

VOCAB, BOS = 300, 2
# tiny_vocab's byte pieces (id 23 + byte) of characters no normal piece covers: text of them encodes back
# to exactly these ids, so a memorized id sequence can be written as a text file for the command.
ALPHABET = torch.tensor([23 + ord(c) for c in "BCDFGJKLMPQRUVWXYZ0123456789"])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _texts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [ALPHABET[torch.randint(0, len(ALPHABET), (20,), generator=g)].tolist() for _ in range(n)]


@pytest.mark.parametrize("a, b, d", [
    ([], [], 0),
    ([], [1, 2], 2),  # two insertions
    ([1, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [1, 3], 1),  # one deletion
    ([1, 2, 3], [1, 4, 3], 1),  # one substitution
    ([1, 2, 3], [3, 2, 1], 2),  # two substitutions (the middle stays)
    ([1, 2, 3, 4], [2, 3, 4, 5], 2),  # shifted by one: delete the first, insert the last
    ([7, 1, 7, 7, 1, 2], [8, 1, 7, 7, 1, 2, 5], 2),  # "kitten" -> "sitting" is 3; this one 1 sub + 1 insertion
    (list("kitten"), list("sitting"), 3),
])
def test_levenshtein_hand_computed(a, b, d):
    assert levenshtein(a, b) == d and levenshtein(b, a) == d


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 1000)
    assert lo == 0.0 and hi == pytest.approx(0.003827, abs=1e-6)  # z^2 / (n + z^2)
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.40383, abs=1e-5), pytest.approx(0.59617, abs=1e-5))
    assert wilson_interval(3, 3)[1] == 1.0


def test_spans_are_deterministic_disjoint_and_inside_one_document():
    lengths = [250, 99, 100, 1234, 0, 530]
    a = sample_spans(lengths, 12, 100, seed=3)
    assert a == sample_spans(lengths, 12, 100, seed=3)
    assert a != sample_spans(lengths, 12, 100, seed=4)
    assert len(a) == 12 and len(set(a)) == 12
    for s in a:
        assert 0 <= s.start and s.start + 100 <= lengths[s.doc]  # never crosses into the next document
    assert not any(s.doc in (1, 4) for s in a)  # shorter than a span: never used
    for x, y in zip(a, a[1:]):  # sorted, and spans of one document never overlap
        assert x.doc < y.doc or x.start + 100 <= y.start
    # 2 + 0 + 1 + 12 + 0 + 5 = 20 disjoint blocks: all of them can be drawn, not one more
    assert len(sample_spans(lengths, 20, 100, seed=0)) == 20
    with pytest.raises(ValueError, match="hold 20 disjoint spans of 100 tokens, fewer than the 21"):
        sample_spans(lengths, 21, 100)
    with pytest.raises(ValueError, match="--samples must be at least 1"):
        sample_spans(lengths, 0, 100)


def test_counting_with_a_stub_generate(monkeypatch):
    """The counting logic alone: a stub engine returns the true suffix with 0, 0, 3, 5 and 6 substitutions."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(10, VOCAB, (n,), generator=g).tolist() for n in (45, 70, 21)]
    spans = sample_spans([len(d) for d in docs], 5, 20, seed=1)
    wrong = dict(zip(spans, [0, 0, 3, 5, 6]))
    answers = {}
    for s in spans:
        suffix = docs[s.doc][s.start + 10:s.start + 20]
        answers[(BOS, *docs[s.doc][s.start:s.start + 10])] = [1 + t if i < wrong[s] else t for i, t in enumerate(suffix)]

    def stub(model, prompts, max_new_tokens, **kw):
        assert max_new_tokens == 10 and kw["stop_ids"] == ()
        outs = [answers[tuple(p)] for p in prompts]
        for i in range(max_new_tokens):
            yield [o[i] for o in outs]

    monkeypatch.setattr(engine, "generate", stub)
    r = memorization(None, docs, BOS, 5, prefix=10, suffix=10, seed=1, batch_size=2, progress=False)
    assert (r.spans, r.max_distance, r.exact, r.approximate) == (5, 1, 2, 2)  # 10 tokens: 10% is 1
    assert sorted(r.distances) == [0, 0, 3, 5, 6]
    r = memorization(None, docs, BOS, 5, prefix=10, suffix=10, seed=1, progress=False)
    assert r.exact_rate == 0.4 and r.exact_ci95 == wilson_interval(2, 5)


def _memorizer(seqs: list[list[int]]):
    """A tiny Gemma 3 trained until, fed each of `seqs` (<bos> + 20 tokens), its greedy prediction of tokens
    11-20 is right (the first ones cannot be: every text starts differently after <bos>)."""
    model = random_model(tiny_config(3).replace(vocab_size=VOCAB, max_seq_len=64, sliding_window=8), seed=1,
                         std=0.02)
    data = torch.tensor([[BOS, *s] for s in seqs])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped, so outside the one_thread fixture
    try:
        for step in range(300):
            logits = model(data[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
            if step % 10 == 0 and bool((logits[:, 10:].argmax(-1) == data[:, 11:]).all()):
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def memorized():
    seqs = _texts(6, seed=5)
    return _memorizer(seqs), seqs


def test_a_model_made_to_memorize(memorized):
    """Trained on six 20-token texts: all six spans are exact; the same texts with 1 suffix token changed
    are approximate only; with 2 changed (over 10% of 10), neither; unseen random text, neither."""
    model, seqs = memorized
    r = memorization(model, seqs, BOS, 6, prefix=10, suffix=10, progress=False)
    assert (r.exact, r.approximate) == (6, 6)
    other = {t: int(ALPHABET[(ALPHABET == t).nonzero().item() - 1]) for t in ALPHABET.tolist()}
    one = [s[:15] + [other[s[15]]] + s[16:] for s in seqs]
    r = memorization(model, one, BOS, 6, prefix=10, suffix=10, progress=False)
    assert (r.exact, r.approximate) == (0, 6) and r.distances == [1] * 6
    two = [s[:12] + [other[s[12]]] + s[13:18] + [other[s[18]]] + s[19:] for s in seqs]
    r = memorization(model, two, BOS, 6, prefix=10, suffix=10, progress=False)
    assert (r.exact, r.approximate) == (0, 0)
    unseen = _texts(6, seed=9)
    r = memorization(model, unseen, BOS, 6, prefix=10, suffix=10, progress=False)
    assert (r.exact, r.approximate) == (0, 0)


def test_memorization_command(memorized, tmp_path, capsys):
    """The command on the memorizing model: JSON counts, and the table."""
    model, seqs = memorized
    vocab = tiny_vocab(VOCAB)
    tok = Tokenizer.from_gguf_vocab(vocab)
    weights.save(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    data = tmp_path / "docs"  # one text file per memorized sequence (ALPHABET: the text encodes back to it)
    data.mkdir()
    for i, s in enumerate(seqs):
        text = tok.decode(s)
        assert tok.encode(text, add_bos=False, parse_special=False) == s
        (data / f"{i}.txt").write_text(text)
    kept = len(seqs)
    argv = ["memorization", "--model", str(tmp_path / "m"), "--data", str(data), "--prefix", "10", "--suffix", "10",
            "--samples", str(kept), "--batch-size", "4"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["spans"], out["exact"], out["approximate"], out["documents"]) == (kept, kept, kept, kept)
    assert out["interval"] == "Wilson score, 95%"
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"exact match        {kept:6d}  100.000%" in table and "Wilson" in table


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--prefix", "0"], "--prefix must be at least 1"),
    (["--data", "MISSING"], "no such file or folder"),
])
def test_memorization_errors_before_loading(args, message, tmp_path, capsys, monkeypatch):
    from gemmakit import hub

    monkeypatch.setattr(hub, "load", lambda *a, **k: pytest.fail("weights were loaded before the error"))
    (tmp_path / "a.txt").write_text("some text")
    args = [str(tmp_path / "nope.txt") if a == "MISSING" else a for a in args]
    argv = ["memorization", "--data", str(tmp_path / "a.txt"), *args]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmakit: error: ") and err.count("\n") == 1 and message in err


def test_compiled_decoding_fills_the_last_batch(monkeypatch):
    """With compile, a last partial batch is filled up with copies (one compiled step per batch size);
    only the real prompts' tokens come back."""
    from gemmakit.eval.memorization import greedy_continuations

    sizes = []

    def stub(model, prompts, max_new_tokens, **kw):
        sizes.append((len(prompts), kw["compile"]))
        for i in range(max_new_tokens):
            yield [p[-1] + i for p in prompts]

    monkeypatch.setattr(engine, "generate", stub)
    prompts = [[BOS, 10 + i] for i in range(10)]
    out = greedy_continuations(None, prompts, 3, batch_size=4, compile=True, progress=False)
    assert sizes == [(4, True)] * 3 and out == [[10 + i, 11 + i, 12 + i] for i in range(10)]
    sizes.clear()
    greedy_continuations(None, prompts, 3, batch_size=4, compile=False, progress=False)
    assert sizes == [(4, False), (4, False), (2, False)]
