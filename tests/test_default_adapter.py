"""gemmakit's shipped chat adapter: `chat` on the embedded model folds it in, `--no-adapter` leaves it out.

The fast tests play the embedded model with a tiny GGUF (as tests/test_cli.py does) and the shipped adapter
with a random one made for it; the `real` test checks the adapter really shipped against the real 270M.
"""

import copy
import io
import json
import sys

import pytest
import torch

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab, write_gguf
from gemmakit import adapters, hub
from gemmakit.cli import main
from gemmakit.engine import generate
from gemmakit.tokenizer import encode_chat

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, CONTEXT = 300, 128


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = random_model(tiny_config(3).replace(vocab_size=VOCAB, max_seq_len=CONTEXT), seed=4)
    meta = {"gemma3.attention.scale": 24.0 ** -0.5, "gemma3.attention.sliding_window_pattern": 3}
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tiny_vocab(VOCAB), extra_meta=meta)


@pytest.fixture
def embedded(tiny_gguf, tmp_path, monkeypatch):
    """The embedded model played by the tiny GGUF, in a fresh cache."""
    monkeypatch.setenv("GEMMAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "default_gguf", lambda verify=False: tiny_gguf)


@pytest.fixture
def shipped(embedded, tmp_path, monkeypatch):
    """A random LoRA adapter for the tiny embedded model, installed as the shipped one."""
    model, _ = hub.load(None)
    gen = torch.Generator().manual_seed(0)
    lora = {name: (torch.randn(4, m.in_features, generator=gen), torch.randn(m.out_features, 4, generator=gen))
            for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
    path = adapters.write_adapter(tmp_path / "shipped", lora, r=4, lora_alpha=4.0)
    monkeypatch.setattr(adapters, "DEFAULT_ADAPTER_DIR", path)
    return path


def _chat(capsys, monkeypatch, *args) -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\nis the\n"))
    assert main(["chat", "--max-new-tokens", "8", "--no-compile", *args]) == 0
    got = capsys.readouterr()
    return got.out, got.err


def test_chat_on_the_default_model_folds_in_the_shipped_adapter(shipped, capsys, monkeypatch):
    out, err = _chat(capsys, monkeypatch)
    assert "gemmakit's chat adapter" in err and "--no-adapter" in err and "not instruction-tuned" not in err
    assert (out, err) == _chat(capsys, monkeypatch, "--model", "default")
    # The same chat as folding the adapter in by hand: the transcript of `--adapter SHIPPED`.
    explicit, _ = _chat(capsys, monkeypatch, "--adapter", str(shipped))
    raw, _ = _chat(capsys, monkeypatch, "--no-adapter")
    assert out == explicit and out != raw


def test_no_adapter_chats_with_the_raw_base(shipped, capsys, monkeypatch):
    out, err = _chat(capsys, monkeypatch, "--no-adapter")
    assert "gemmakit's chat adapter" not in err and "not instruction-tuned" in err
    model, tok = hub.load(None)
    ids = encode_chat(tok, [{"role": "user", "content": "the"}], 3)
    reply = []
    for (t,) in generate(model, [ids], 8, stop_ids=tok.stop_ids):
        if t in tok.stop_ids:
            break
        reply.append(t)
    assert out.startswith(f"> the\n{tok.decode(reply)}\n\n")
    monkeypatch.setattr(adapters, "DEFAULT_ADAPTER_DIR", shipped.parent / "none")  # an install without one
    assert _chat(capsys, monkeypatch)[0] == out


def test_no_adapter_with_adapter_is_refused_before_loading(shipped, capsys, monkeypatch):
    monkeypatch.setattr(hub, "load", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\n"))
    assert main(["chat", "--no-adapter", "--adapter", str(shipped)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmakit: error: --no-adapter and --adapter DIR contradict each other") and err.count("\n") == 1


def test_other_models_get_no_shipped_adapter(shipped, tmp_path, capsys, monkeypatch):
    from gemmakit import weights

    # The embedded model's own weights, saved as a directory: not `default`, so not adapted.
    model, tok = hub.load(None)
    weights.save(model, tmp_path / "copy", tokenizer=tok)
    out, err = _chat(capsys, monkeypatch, "--model", str(tmp_path / "copy"))
    assert "gemmakit's chat adapter" not in err
    assert out == _chat(capsys, monkeypatch, "--no-adapter")[0]


def test_a_shipped_adapter_that_does_not_fit_is_left_out_with_a_warning(shipped, tmp_path, capsys, monkeypatch):
    bad = adapters.write_adapter(tmp_path / "bad", {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 640),
                                                                                         torch.zeros(1024, 2))}, 2, 2.0)
    monkeypatch.setattr(adapters, "DEFAULT_ADAPTER_DIR", bad)
    out, err = _chat(capsys, monkeypatch)
    assert "warning: gemmakit's chat adapter does not fit the embedded Gemma 3 270M" in err
    assert "q_proj" in err and out == _chat(capsys, monkeypatch, "--no-adapter")[0]


@pytest.mark.real
def test_the_shipped_adapter_fits_the_real_embedded_model_and_chat_uses_it(real_model, capsys, monkeypatch):
    shipped = adapters.default_adapter()
    assert shipped is not None, "gemmakit/default_adapter/ is missing (package data)"
    config = json.loads((shipped / adapters.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and (shipped / adapters.ADAPTER_WEIGHTS).stat().st_size < 10 << 20
    model, tok = real_model
    tuned = copy.deepcopy(model)
    assert adapters.load_adapter(tuned, shipped) == 18 * 7  # every attention and MLP projection of 18 layers
    ids = encode_chat(tok, [{"role": "user", "content": "What is AI?"}], 3)
    want = [t for (t,) in generate(tuned, [ids], 24, stop_ids=tok.stop_ids)]
    eot = tok.token_id("<end_of_turn>")
    text = tok.decode([t for t in want if t != eot])
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is AI?\n"))
    assert main(["chat", "--max-new-tokens", "24", "--no-compile"]) == 0
    got = capsys.readouterr()
    assert got.out == f"> What is AI?\n{text}\n\n" and "gemmakit's chat adapter" in got.err
