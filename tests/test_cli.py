"""The `gemmakit` command on a tiny random model: generate, chat, info, convert, perplexity, bad input."""

import io
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab, write_gguf
from gemmakit import weights
from gemmakit.cli import main
from gemmakit.engine import generate
from gemmakit.evaluate import perplexity, window_nll, windows
from gemmakit.hub import load
from gemmakit.tokenizer import Tokenizer, encode_chat

VOCAB, CONTEXT = 300, 128


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF directory: config.json + safetensors + tokenizer.model of a tiny random Gemma 3."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = random_model(tiny_config(3).replace(vocab_size=VOCAB, max_seq_len=CONTEXT), seed=3)
    weights.save(model, path)
    Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = random_model(tiny_config(3).replace(vocab_size=VOCAB, max_seq_len=CONTEXT), seed=4)
    meta = {"gemma3.attention.scale": 24.0 ** -0.5, "gemma3.attention.sliding_window_pattern": 3}
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tiny_vocab(VOCAB), extra_meta=meta)


def _greedy_text(model, tok, ids, n):
    out = []
    for (t,) in generate(model, [ids], n, stop_ids=tok.stop_ids):
        if t in tok.stop_ids:
            break
        out.append(t)
    return tok.decode(out)


def test_generate_streams_the_engine_output(tiny_dir, capsys):
    assert main(["generate", "the thesis", "--model", str(tiny_dir), "--max-new-tokens", "12"]) == 0
    model, tok = load(str(tiny_dir))
    want = "the thesis" + _greedy_text(model, tok, tok.encode("the thesis"), 12) + "\n"
    assert capsys.readouterr().out == want


def test_generate_sampling_is_seeded(tiny_dir, capsys):
    args = ["generate", "the", "--model", str(tiny_dir), "--max-new-tokens", "10", "--temperature", "1.0",
            "--top-k", "50", "--top-p", "0.9", "--no-echo"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main(args + ["--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_generate_in_bfloat16(tiny_dir, capsys):
    assert main(["generate", "the", "--model", str(tiny_dir), "--max-new-tokens", "4", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_stream_writes_each_piece_as_it_comes(tiny_dir):
    from argparse import Namespace

    from gemmakit.cli import _stream

    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            self.writes += bool(s)
            return super().write(s)

    model, tok = load(str(tiny_dir))
    out = Recorder()
    args = Namespace(max_new_tokens=8, temperature=0.0, top_k=None, top_p=None, seed=None)
    text = _stream(model, tok, tok.encode("the"), args, out)
    assert out.getvalue() == text and out.writes >= 2


def test_chat_reads_stdin_when_not_a_terminal(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\n\nis the\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    model, tok = load(str(tiny_dir))
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the"}]
    reply = _greedy_text(model, tok, encode_chat(tok, first, 3), 6)
    second = first + [{"role": "model", "content": reply}, {"role": "user", "content": "is the"}]
    reply2 = _greedy_text(model, tok, encode_chat(tok, second, 3), 6)
    assert out == reply + "\n" + reply2 + "\n"


def test_chat_reply_is_capped_at_the_context(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "1000"]) == 0  # 1000 > context 128
    assert capsys.readouterr().err == ""


def test_info_reads_files_and_directories(tiny_dir, tiny_gguf, capsys):
    for spec, vocab in ((str(tiny_dir), VOCAB), (str(tiny_gguf), VOCAB), ("gemma3-270m", 262144)):
        assert main(["info", spec]) == 0
        out = capsys.readouterr().out
        assert "(Gemma 3)" in out and f"vocab_size               {vocab}\n" in out


def test_convert_writes_a_directory_transformers_loads(tiny_gguf, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_gguf), str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temp directory left behind
    ours, tok = load(str(tiny_gguf))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok.encode("the thesis is in é")
    assert ref_tok("the thesis is in é").input_ids == ids
    with torch.no_grad():
        torch.testing.assert_close(ref(torch.tensor([ids])).logits, ours(torch.tensor([ids])), rtol=1e-5, atol=1e-5)
    # Never overwrites a non-empty directory.
    assert main(["convert", str(tiny_gguf), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_perplexity_windows_and_cache_chunks(tiny_dir, tmp_path, capsys):
    model, tok = load(str(tiny_dir))
    text = "the thesis is in the sea and the sun is on the hill. " * 6
    ids = tok.encode(text, add_bos=False)
    # Reference: each window of 16 run in one plain forward, no cache.
    nll = n = 0
    for w in windows(ids, 16, tok.bos_id):
        assert w[0] == tok.bos_id and len(w) <= 16
        with torch.no_grad():
            logits = model(torch.tensor([w]))[0, :-1]
        nll += F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
        n += len(w) - 1
    assert n == len(ids)
    got = perplexity(model, ids, tok.bos_id, context=16, progress=False)
    assert got.tokens == n and math.isclose(got.perplexity, math.exp(nll / n), rel_tol=1e-5)
    # Chunking the window through the KV cache gives the same sum.
    w = [tok.bos_id, *ids[:40]]
    assert math.isclose(window_nll(model, w, chunk=7)[0], window_nll(model, w, chunk=64)[0], rel_tol=1e-5)

    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    assert main(["perplexity", str(f), "--model", str(tiny_dir), "--context", "16"]) == 0
    assert f"perplexity {got.perplexity:.4f}  tokens {n}" in capsys.readouterr().out
    # Default: the whole file in one window when it fits, else windows of the full context.
    assert perplexity(model, ids, tok.bos_id, progress=False).context == CONTEXT


# -- bad input: one line naming the problem, no traceback ----------------------------------------------

def _error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmakit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_errors_name_the_problem(tiny_dir, tiny_gguf, tmp_path, capsys):
    half = tmp_path / "half.gguf"
    half.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert "truncated" in _error(["generate", "x", "--model", str(half)], capsys)
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(bytes(range(256)) * 8)
    assert "not a GGUF file" in _error(["generate", "x", "--model", str(noise)], capsys)
    assert "not a GGUF file" in _error(["info", str(noise)], capsys)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert "has no config.json" in _error(["generate", "x", "--model", str(empty)], capsys)
    assert "unknown model 'gemma9-xl'" in _error(["info", "gemma9-xl"], capsys)
    assert "unknown model 'gemma9-xl'" in _error(["generate", "x", "--model", "gemma9-xl"], capsys)
    assert "is a preset" in _error(["generate", "x", "--model", "gemma3-1b"], capsys)
    long = "the " * 200
    assert "context length of 128" in _error(["generate", long, "--model", str(tiny_dir)], capsys)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    assert "not valid UTF-8" in _error(["perplexity", str(bad), "--model", str(tiny_dir)], capsys)
    with pytest.raises(ValueError, match="not a GGUF file"):  # --debug: the traceback
        main(["--debug", "generate", "x", "--model", str(noise)])


@pytest.mark.slow
def test_command_line_process_has_no_traceback(tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(b"\x00" * 1000)
    r = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "hi", "--model", str(noise)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr
