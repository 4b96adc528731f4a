"""`gemmakit generate` as llama.cpp and mlx-lm users expect it, on a tiny random model: prompt from a
file or stdin, --min-p, --stop, --repetition-penalty, --json, --batch; options checked before loading."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab
from gemmakit import weights
from gemmakit.cli import main
from gemmakit.hub import load
from gemmakit.tokenizer import Tokenizer

VOCAB, CONTEXT, N = 300, 128, 24
PROMPT = "the thesis"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF directory of a tiny random Gemma 3 that writes readable text: the rows of every id below the
    "\\n" piece (specials, unused and byte pieces) are zero, so it picks among "\\n" and the letter pieces."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = random_model(tiny_config(3).replace(vocab_size=VOCAB, max_seq_len=CONTEXT), seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:  # larger projections: the model does not just echo its last token
                p.normal_(0, 0.3, generator=g)
        vocab = tiny_vocab(VOCAB)
        model.model.embed_tokens.weight[:vocab.tokens.index("\n")] = 0.0
    weights.save(model, path)
    Tokenizer.from_gguf_vocab(vocab).save(path)
    return path


@pytest.fixture(scope="module")
def greedy(tiny_dir):
    """The greedy continuation of PROMPT, N tokens, decoded at once."""
    from gemmakit.engine import generate

    model, tok = load(str(tiny_dir))
    text = tok.decode([t for (t,) in generate(model, [tok.encode(PROMPT)], N)])  # no stop id comes up
    assert len(set(text)) >= 5 and " the" in text  # varied enough for the stop-string tests below
    return text


def generate_text(*args, **kwargs):
    from gemmakit.engine import generate_text  # imported here: on a gemmakit without it, each test fails alone

    return generate_text(*args, **kwargs)


def _run(tiny_dir, capsys, *argv, stdin: bytes | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    assert main(["generate", *argv, "--model", str(tiny_dir), "--max-new-tokens", str(N)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _error(argv, capsys) -> str:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""  # nothing echoed before the error
    assert err.startswith("gemmakit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: for errors that must come before any loading."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("gemmakit.hub.load", load)


# -- prompt from stdin, a file, a batch file -----------------------------------------------------------------

def test_prompt_dash_reads_stdin(tiny_dir, greedy, capsys, monkeypatch):
    assert _run(tiny_dir, capsys, "-", stdin=PROMPT.encode(), monkeypatch=monkeypatch) == PROMPT + greedy + "\n"


def test_prompt_from_a_file(tiny_dir, greedy, tmp_path, capsys, monkeypatch):
    f = tmp_path / "prompt.txt"
    f.write_bytes(PROMPT.encode() + b"\n")  # an editor's final newline is not part of the prompt
    assert _run(tiny_dir, capsys, "-f", str(f)) == PROMPT + greedy + "\n"
    assert _run(tiny_dir, capsys, "--file", str(f), "--no-echo") == greedy + "\n"
    stdin = dict(stdin=PROMPT.encode(), monkeypatch=monkeypatch)
    assert _run(tiny_dir, capsys, "--file", "-", **stdin) == PROMPT + greedy + "\n"
    assert "not a PROMPT and --file" in _error(["generate", "x", "-f", str(f), "--model", str(tiny_dir)], capsys)
    assert "give the prompt" in _error(["generate", "--model", str(tiny_dir)], capsys)
    assert "no such prompt file" in _error(["generate", "-f", str(tmp_path / "nope"), "--model", str(tiny_dir)], capsys)
    assert "is a directory" in _error(["generate", "-f", str(tmp_path), "--model", str(tiny_dir)], capsys)


def test_batch_file_generates_every_line_in_input_order(tiny_dir, tmp_path, capsys, monkeypatch):
    prompts = ["the thesis", "a", "is the sea on the hill"]  # different lengths: left padded in one batch
    f = tmp_path / "prompts.txt"
    f.write_text("\r\n".join(prompts) + "\r\n", encoding="utf-8")
    singles = [_run(tiny_dir, capsys, p) for p in prompts]
    import gemmakit.engine

    calls, real = [], gemmakit.engine.generate
    monkeypatch.setattr(gemmakit.engine, "generate", lambda m, ids, *a, **k: calls.append(ids) or real(m, ids, *a, **k))
    assert _run(tiny_dir, capsys, "--batch", str(f)) == "".join(singles)
    assert len(calls) == 1 and len(calls[0]) == 3  # one batch
    lines = _run(tiny_dir, capsys, "--batch", str(f), "--json").splitlines()
    assert [json.loads(line)["text"] for line in lines] == [s[len(p):-1] for p, s in zip(prompts, singles)]
    f.write_text("the\n\nsea\n", encoding="utf-8")
    assert "line 2 of" in _error(["generate", "--batch", str(f), "--model", str(tiny_dir)], capsys)


# -- sampling options ------------------------------------------------------------------------------------

def test_min_p_is_applied(tiny_dir, greedy, capsys):
    hot = ["--temperature", "50", "--seed", "0", "--no-echo"]
    assert _run(tiny_dir, capsys, PROMPT, *hot) != greedy + "\n"  # so hot that it is near uniform
    assert _run(tiny_dir, capsys, PROMPT, *hot, "--min-p", "1.0") == greedy + "\n"  # only the top token is left


def test_repetition_penalty(tiny_dir, greedy, capsys):
    model, tok = load(str(tiny_dir))
    want = generate_text(model, tok, PROMPT, N, repetition_penalty=1.5)
    assert want != greedy
    assert _run(tiny_dir, capsys, PROMPT, "--repetition-penalty", "1.5", "--no-echo") == want + "\n"


def test_stop_strings_end_the_text_and_are_not_printed(tiny_dir, greedy, capsys):
    cut = greedy.index(" the")
    assert _run(tiny_dir, capsys, PROMPT, "--stop", " the") == PROMPT + greedy[:cut] + "\n"
    # Repeatable: the first to appear ends the text.
    later = greedy[cut + 1:cut + 4]
    assert _run(tiny_dir, capsys, PROMPT, "--stop", later, "--stop", " the") == PROMPT + greedy[:cut] + "\n"
    # A tail that only looks like the start of a stop string is held back, then printed.
    assert _run(tiny_dir, capsys, PROMPT, "--stop", " the" + "\u2603") == PROMPT + greedy + "\n"


def test_json_output(tiny_dir, greedy, capsys):
    model, tok = load(str(tiny_dir))
    out = _run(tiny_dir, capsys, PROMPT, "--json")
    assert out.count("\n") == 1
    r = json.loads(out)
    assert r["text"] == greedy and r["finish_reason"] == "length"
    n_prompt = len(tok.encode(PROMPT))
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": N, "total_tokens": n_prompt + N}
    t = r["timings"]
    assert t["prefill_seconds"] > 0 and t["decode_seconds"] > 0
    assert t["prefill_tokens_per_second"] == pytest.approx(n_prompt / t["prefill_seconds"], rel=1e-3)
    assert t["decode_tokens_per_second"] == pytest.approx((N - 1) / t["decode_seconds"], rel=1e-3)
    stopped = json.loads(_run(tiny_dir, capsys, PROMPT, "--json", "--stop", " the"))
    assert stopped["text"] == greedy[:greedy.index(" the")] and stopped["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] < N


# -- options checked before anything loads, greedy ignoring sampling options -------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "-1", "--temperature must be >= 0, got -1.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--top-k", "0", "--top-k must be >= 1, got 0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
    ("--min-p", "2", "--min-p must be in [0, 1], got 2.0"),
    ("--repetition-penalty", "0", "--repetition-penalty must be > 0, got 0.0"),
    ("--stop", "", "--stop needs a non-empty string"),
])
def test_bad_options_are_reported_before_loading(tiny_dir, capsys, no_loading, option, value, message):
    argv = ["generate", PROMPT, "--model", str(tiny_dir), "--temperature", "1", option, value]
    assert message in _error(argv, capsys)
    assert "not valid UTF-8" in _error(["generate", PROMPT, "--model", str(tiny_dir), "--stop", "\udcff"], capsys)


def test_prompt_too_long_echoes_nothing(tiny_dir, capsys):
    assert "context length of 128" in _error(["generate", "the " * 200, "--model", str(tiny_dir)], capsys)


def test_greedy_warns_that_sampling_options_have_no_effect(tiny_dir, greedy, capsys):
    assert main(["generate", PROMPT, "--model", str(tiny_dir), "--max-new-tokens", str(N), "--top-k", "5",
                 "--top-p", "0.9", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + greedy + "\n"  # still greedy
    assert err.startswith("gemmakit: warning: --top-k, --top-p, --seed have no effect with greedy decoding")
    assert err.count("\n") == 1


# -- invalid UTF-8: one line naming the byte, before loading ------------------------------------------------

def test_invalid_utf8_prompt_names_the_byte(tiny_dir, tmp_path, capsys, monkeypatch, no_loading):
    # Python hands invalid argv bytes over as lone surrogates (surrogateescape): b"ok \xff" -> "ok \udcff".
    model = ["--model", str(tiny_dir)]
    assert "the prompt is not valid UTF-8 (byte 3)" in _error(["generate", "ok \udcff", *model], capsys)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xc3\xa9 \xff\xfe")
    assert f"{bad} is not valid UTF-8 (byte 6)" in _error(["generate", "-f", str(bad), *model], capsys)
    assert f"{bad} is not valid UTF-8 (byte 6)" in _error(["generate", "--batch", str(bad), *model], capsys)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xc3(abc"), encoding="utf-8"))
    assert "stdin is not valid UTF-8 (byte 0)" in _error(["generate", "-", *model], capsys)


def test_invalid_utf8_argv_in_a_process(tiny_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", b"ok \xff", "--model", str(tiny_dir)],
                       capture_output=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr == b"gemmakit: error: the prompt is not valid UTF-8 (byte 3)\n"


def test_adapter_option_folds_a_peft_adapter_into_the_model(tiny_dir, tmp_path, capsys):
    """`--adapter DIR` (generate, chat, perplexity) gives what the merged model gives, and the adapter matters."""
    from gemmakit.train.lora import apply_lora, merge_lora, save_adapter

    model, tok = load(str(tiny_dir))
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "down_proj"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5, generator=g)
    save_adapter(model, tmp_path / "adapter")
    merge_lora(model)
    weights.save(model, tmp_path / "merged", tokenizer=tok)
    plain = _run(tiny_dir, capsys, PROMPT)
    assert main(["generate", PROMPT, "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", str(N)]) == 0
    adapted = capsys.readouterr().out
    assert adapted == _run(tmp_path / "merged", capsys, PROMPT) and adapted != plain
    assert "adapter" in _error(["generate", PROMPT, "--model", str(tiny_dir), "--adapter", str(tmp_path / "nope")],
                               capsys)


def test_quantize_computes_in_bf16_unless_dtype_is_given(tiny_dir, monkeypatch):
    """torch's int8/int4 kernels are fast with bf16 activations: --quantize defaults to bfloat16 compute."""
    from gemmakit import hub

    seen = []
    real = hub.load
    monkeypatch.setattr(hub, "load", lambda spec, dtype, **kw: seen.append(dtype) or real(spec, dtype=dtype, **kw))
    for extra in ([], ["--quantize", "int8"], ["--quantize", "int8", "--dtype", "float32"]):
        assert main(["generate", PROMPT, "--model", str(tiny_dir), "--max-new-tokens", "2", *extra]) == 0
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
