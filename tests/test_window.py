"""Inference-time sliding window override (`--sliding-window N`, issue 15 item 3) on tiny models."""

import math

import pytest
import torch

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab
from gemmakit import engine, weights
from gemmakit.cache import make_cache
from gemmakit.cli import main
from gemmakit.config import LOCAL
from gemmakit.eval.window import set_sliding_window
from gemmakit.evaluate import perplexity
from gemmakit.hub import load
from gemmakit.tokenizer import Tokenizer

VOCAB, CONTEXT = 300, 128


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _pair(generation: int, trained: int, override: int):
    """(the model trained with `trained` overridden to `override`, the same weights built with `override`)."""
    base = tiny_config(generation).replace(vocab_size=VOCAB, max_seq_len=CONTEXT, sliding_window=trained)
    model = random_model(base, seed=7)
    built = random_model(base.replace(sliding_window=override), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), built.state_dict().values()))
    return set_sliding_window(model, override), built


@pytest.mark.parametrize("generation", [2, 3])
@pytest.mark.parametrize("trained, override", [(8, 3), (3, 8), (8, 1)])  # shorter, longer, the current token only
def test_override_equals_a_model_built_with_that_window(generation, trained, override):
    model, built = _pair(generation, trained, override)
    assert model.config == built.config
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))  # longer than every window
    with torch.no_grad():
        torch.testing.assert_close(model(ids), built(ids), atol=1e-6, rtol=0)
        # Through the KV cache in chunks (the ring buffers wrap) too, as perplexity and the engine run it.
        def chunked(m):
            cache = make_cache(m.config, 2, 24)
            return torch.cat([m(ids[:, s:s + 5], cache=cache) for s in range(0, 24, 5)], 1)

        torch.testing.assert_close(chunked(model), chunked(built), atol=1e-6, rtol=0)
    # Without the override the logits differ: the window matters on this input.
    assert not torch.allclose(random_model(tiny_config(generation).replace(
        vocab_size=VOCAB, max_seq_len=CONTEXT, sliding_window=trained), seed=7)(ids), built(ids), atol=1e-3)


def test_cache_is_sized_to_the_new_window(monkeypatch):
    model, _ = _pair(3, 8, 3)
    sizes = [c.size for c in make_cache(model.config, 1, 64)]
    assert sizes == [3 if kind == LOCAL else 64 for kind in model.config.layer_types]
    assert all(layer.self_attn.window == (3 if layer.kind == LOCAL else None) for layer in model.model.layers)
    # The engine's caches come from the model's config: local layers get 3 slots.
    made = []
    real = engine.make_cache
    monkeypatch.setattr(engine, "make_cache", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    steps = list(engine.generate(model, [[2, 5, 6, 7, 8, 9]], 10))
    _, built = _pair(3, 8, 3)
    assert steps == list(engine.generate(built, [[2, 5, 6, 7, 8, 9]], 10))
    assert [c.size for c in made[0]] == [3, 3, 15]  # layers L L G; 6 prompt + 10 new - 1 slots for the global one


@pytest.mark.parametrize("window", [0, -4])
def test_override_refuses_a_window_below_one(window):
    model, _ = _pair(3, 8, 3)
    with pytest.raises(ValueError, match="--sliding-window must be a whole number of tokens >= 1"):
        set_sliding_window(model, window)


def test_override_refuses_a_model_without_local_layers():
    model = random_model(tiny_config(1).replace(vocab_size=VOCAB, max_seq_len=CONTEXT))
    with pytest.raises(ValueError, match="no local .sliding-window. layers"):
        set_sliding_window(model, 4)


# -- the command line ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """HF directories of one tiny Gemma 3 saved with window 8 (trained) and with window 3, and a Gemma 1."""
    root = tmp_path_factory.mktemp("window")
    base = tiny_config(3).replace(vocab_size=VOCAB, max_seq_len=CONTEXT, sliding_window=8)
    out = {}
    for name, config in [("w8", base), ("w3", base.replace(sliding_window=3)),
                         ("g1", tiny_config(1).replace(vocab_size=VOCAB, max_seq_len=CONTEXT))]:
        out[name] = root / name
        weights.save(random_model(config, seed=7), out[name])
        Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB)).save(out[name])
    return out


def test_perplexity_with_sliding_window(dirs, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("the thesis is in the sea and the sun is on the hill. " * 3)
    assert main(["perplexity", str(f), "--model", str(dirs["w8"]), "--sliding-window", "3"]) == 0
    got = capsys.readouterr().out
    model, tok = load(str(dirs["w3"]))
    want = perplexity(model, tok.encode(f.read_text(), add_bos=False, parse_special=False), tok.bos_id,
                      progress=False)
    assert math.isclose(float(got.split()[1]), want.perplexity, rel_tol=1e-5)
    assert main(["perplexity", str(f), "--model", str(dirs["w8"])]) == 0  # and the trained window differs
    assert not math.isclose(float(capsys.readouterr().out.split()[1]), want.perplexity, rel_tol=1e-3)


@pytest.mark.parametrize("command", [["generate", "the thesis is in the sea"], ["chat"]])
def test_generate_and_chat_with_sliding_window(command, dirs, capsys, monkeypatch):
    import io
    import sys

    def run(model_dir, extra=()):
        monkeypatch.setattr(sys, "stdin", io.StringIO("the thesis is in the sea\n"))
        assert main([*command, "--model", str(model_dir), "--max-new-tokens", "12", "--no-compile", *extra]) == 0
        return capsys.readouterr().out

    assert run(dirs["w8"], ["--sliding-window", "3"]) == run(dirs["w3"])


@pytest.mark.parametrize("model, n, message", [
    ("w8", "0", "--sliding-window must be a whole number of tokens >= 1, got 0"),
    ("g1", "4", "has no local (sliding-window) layers"),
])
@pytest.mark.parametrize("command", [["generate", "the"], ["perplexity", "FILE"], ["chat"]])
def test_sliding_window_errors_before_loading(model, n, message, command, dirs, tmp_path, capsys, monkeypatch):
    from gemmakit import hub

    monkeypatch.setattr(hub, "load", lambda *a, **k: pytest.fail("weights were loaded before the error"))
    f = tmp_path / "t.txt"
    f.write_text("the thesis")
    argv = [str(f) if a == "FILE" else a for a in command] + ["--model", str(dirs[model]), "--sliding-window", n]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmakit: error: ") and err.count("\n") == 1 and message in err
