"""The `gemmakit` command on a tiny random model: generate, chat, info, convert, perplexity, bad input."""

import io
import math
import os
import subprocess
import sys
from pathlib import Path

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


def _stdin(data: bytes):
    """A piped stdin: text on top of a byte buffer, as Python sets it up."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


def _chat_replies(tiny_dir, turns: list[str], n: int, system: str | None = None) -> list[str]:
    """Greedy replies of the tiny model to a conversation of `turns`, each turn seeing the ones before."""
    model, tok = load(str(tiny_dir))
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        replies.append(_greedy_text(model, tok, encode_chat(tok, messages, 3), n))
        messages.append({"role": "model", "content": replies[-1]})
    return replies


def test_chat_piped_output_marks_each_turn(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\n\nis the\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    reply, reply2 = _chat_replies(tiny_dir, ["the", "is the"], 6, system="Be brief.")
    # A transcript: each user line marked "> ", each reply followed by a blank line.
    assert capsys.readouterr().out == f"> the\n{reply}\n\n> is the\n{reply2}\n\n"


def test_chat_reply_is_capped_at_the_context(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "1000"]) == 0  # 1000 > context 128
    assert "error" not in capsys.readouterr().err


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


# -- `default` is the embedded model wherever a model is named (issue 13, item 8) ----------------------

@pytest.fixture
def embedded(tiny_gguf, tmp_path, monkeypatch):
    """The embedded model played by the tiny GGUF, in a fresh cache: the real code converts and loads it."""
    from gemmakit import hub

    monkeypatch.setenv("GEMMAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "default_gguf", lambda verify=False: tiny_gguf)
    return tmp_path / "home"


@pytest.mark.parametrize("command", ["generate", "chat", "perplexity"])
def test_model_default_is_the_embedded_model(command, embedded, tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("the thesis is in the sea")
    argv = {"generate": ["generate", "the", "--max-new-tokens", "5"], "chat": ["chat", "--max-new-tokens", "5"],
            "perplexity": ["perplexity", str(text)]}[command]
    outs = []
    for extra in ([], ["--model", "default"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("the\n"))
        assert main(argv + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_info_default_is_the_embedded_model(embedded, tiny_gguf, capsys):
    assert main(["info", "default"]) == 0
    out = capsys.readouterr().out
    # Named as the user knows it, not by its cache path; the same config as the GGUF it comes from.
    assert out.startswith("the embedded Gemma 3 270M (Gemma 3)\n") and str(embedded) not in out
    assert main(["info", str(tiny_gguf)]) == 0
    assert capsys.readouterr().out.split("\n", 1)[1] == out.split("\n", 1)[1]


def test_convert_default_converts_the_embedded_gguf(embedded, tiny_gguf, tmp_path, capsys):
    assert main(["convert", "default", str(tmp_path / "out")]) == 0
    assert main(["convert", str(tiny_gguf), str(tmp_path / "ref")]) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


# -- errors name what the user chose, and how to fix it (item 10) -------------------------------------

def test_corrupt_cached_checkpoint_is_rebuilt(embedded, capsys):
    argv = ["generate", "the", "--max-new-tokens", "5"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    weights_file = next(embedded.glob("gemma-3-270m-*/model.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # truncated, as by a full disk or a killed copy
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == want
    assert "the embedded Gemma 3 270M" in captured.err and "rebuilding it" in captured.err
    assert main(argv) == 0 and capsys.readouterr().err == ""  # rebuilt for good
    (weights_file.parent / "config.json").unlink()  # a directory without its config is rebuilt too
    assert main(argv) == 0 and capsys.readouterr().out == want


def test_outdated_cached_conversion_is_converted_again(embedded, capsys):
    """A cache converted before saved directories carried the chat template and stop ids gets them."""
    from gemmakit import hub

    target = hub.default_checkpoint()
    capsys.readouterr()
    (target / "generation_config.json").unlink()  # as an earlier gemmakit wrote it
    assert hub.default_checkpoint() == target
    assert "updating the cached conversion" in capsys.readouterr().err
    assert (target / "generation_config.json").is_file()
    assert "chat_template" in (target / "tokenizer_config.json").read_text()


def test_cache_errors_name_the_embedded_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("GEMMAKIT_HOME", str(tmp_path / "home"))
    err = _error(["generate", "the"], capsys)
    assert f"the embedded Gemma 3 270M (cache at {tmp_path / 'home'})" in err and "GEMMAKIT_HOME" in err


@pytest.mark.parametrize("case", ["perplexity-folder", "convert-folder", "convert-unreadable"])
def test_path_arguments_say_what_is_wrong(case, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "notes"
    folder.mkdir()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    if case == "perplexity-folder":  # was a raw "[Errno 21] Is a directory"
        assert f"{folder} is a directory, not a text file" in _error(["perplexity", str(folder)], capsys)
    elif case == "convert-folder":  # was "no such GGUF file"
        assert f"{folder} is a directory, not a GGUF file" in _error(["convert", str(folder), str(tmp_path / "o")], capsys)
    else:
        monkeypatch.setattr("os.access", lambda path, mode: False)  # as an unprivileged user after chmod 000
        assert f"cannot read the GGUF file {gguf}" in _error(["convert", str(gguf), str(tmp_path / "o")], capsys)


def test_os_errors_are_one_line_without_errno(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    f = tmp_path / "t.txt"
    f.write_text("the")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    err = _error(["perplexity", str(f)], capsys)
    assert err == f"gemmakit: error: {f}: permission denied\n"


def test_debug_works_after_the_subcommand(tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a GGUF file"):
        main(["generate", "x", "--model", str(noise), "--debug"])
    with pytest.raises(ValueError, match="not a GGUF file"):
        main(["info", str(noise), "--debug"])


# -- chat (items 5 and 12) ------------------------------------------------------------------------------

def _chat(tiny_dir, stdin: str, capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "6", *args]) == 0
    return capsys.readouterr()


def test_chat_help_is_shown_not_sent(tiny_dir, capsys, monkeypatch):
    got = _chat(tiny_dir, "/help\nthe\n", capsys, monkeypatch)
    (reply,) = _chat_replies(tiny_dir, ["the"], 6)
    assert got.out == f"> the\n{reply}\n\n" and "/reset" in got.err and "/quit" in got.err


def test_chat_warns_that_sampling_options_have_no_effect_when_greedy(tiny_dir, capsys, monkeypatch):
    got = _chat(tiny_dir, "the\n", capsys, monkeypatch, "--top-k", "5")
    assert "--top-k has no effect with greedy decoding" in got.err


def test_chat_quit_confirms_and_ends(tiny_dir, capsys, monkeypatch):
    got = _chat(tiny_dir, "/quit\nthe\n", capsys, monkeypatch)
    assert got.out == "" and "(chat ended)" in got.err


def test_chat_reset_confirms_and_forgets(tiny_dir, capsys, monkeypatch):
    got = _chat(tiny_dir, "the\n/reset\nthe\n", capsys, monkeypatch, "--system", "Be brief.")
    (reply,) = _chat_replies(tiny_dir, ["the"], 6, system="Be brief.")
    assert got.out == f"> the\n{reply}\n\n" * 2  # the second turn starts over, the system prompt kept
    assert "(conversation cleared; the system prompt stays)" in got.err


def test_chat_unknown_command_is_refused(tiny_dir, capsys, monkeypatch):
    got = _chat(tiny_dir, "/sytem be nice\n//the\n", capsys, monkeypatch)
    (reply,) = _chat_replies(tiny_dir, ["/the"], 6)
    assert "unknown command /sytem (not sent to the model)" in got.err and "/help" in got.err
    assert got.out == f"> /the\n{reply}\n\n"  # "//" sends a message that starts with "/"


def test_chat_says_once_that_a_base_model_chats_poorly(tiny_dir, tmp_path, capsys, monkeypatch):
    got = _chat(tiny_dir, "the\nis the\n", capsys, monkeypatch)
    assert got.err.count("base model") == 1 and "-it" in got.err
    tuned = tmp_path / "gemma-3-tiny-it"
    tuned.symlink_to(tiny_dir, target_is_directory=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\n"))
    assert main(["chat", "--model", str(tuned), "--max-new-tokens", "2"]) == 0
    assert "base model" not in capsys.readouterr().err


def test_chat_invalid_utf8_on_stdin_names_the_byte(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _stdin(b"the\nok \xff\xfe no\nis the\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "6"]) == 0
    got = capsys.readouterr()
    assert "gemmakit: error: line 2 of stdin is not valid UTF-8 (byte 3); it was not sent\n" in got.err
    reply, reply2 = _chat_replies(tiny_dir, ["the", "is the"], 6)  # the chat went on without line 2
    assert got.out == f"> the\n{reply}\n\n> is the\n{reply2}\n\n" and "Traceback" not in got.err


def test_chat_invalid_utf8_typed_at_the_prompt(tiny_dir, capsys, monkeypatch):
    typed = iter(["ok \udcff", "the"])  # what input() returns for b"ok \xff" under surrogateescape

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "6"]) == 0
    got = capsys.readouterr()
    assert "your message is not valid UTF-8 (byte 3); it was not sent" in got.err
    (reply,) = _chat_replies(tiny_dir, ["the"], 6)
    assert got.out == reply + "\n"


# -- options and paths are checked before anything loads (item 9) ------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Any weight loading fails the test: errors must come first."""
    from gemmakit import gguf, hub

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(hub, "load", refuse)
    monkeypatch.setattr(gguf, "load_gguf", refuse)


def test_convert_checks_the_output_folder_first(tiny_gguf, tmp_path, capsys, no_loading):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert f"{blocker} is a file, not a directory" in _error(["convert", str(tiny_gguf), str(blocker / "out")], capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root writes into a 0555 folder anyway; /proc refuses new files to everyone
    target = locked / "out" if os.geteuid() != 0 else Path("/proc/gemmakit-test-out")
    err = _error(["convert", str(tiny_gguf), str(target)], capsys)
    assert f"cannot create {target}" in err and ".tmp" not in err
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("args, message", [
    (["--context", "1"], "--context must be at least 2"),
    (["--context", "129"], "exceeds"),  # the tiny model's context is 128
    (["--empty"], "is empty"),
])
def test_perplexity_checks_before_loading(args, message, tiny_dir, tmp_path, capsys, no_loading):
    f = tmp_path / "t.txt"
    f.write_text("" if args == ["--empty"] else "the thesis")
    argv = ["perplexity", str(f), "--model", str(tiny_dir)] + ([] if args == ["--empty"] else args)
    assert message in _error(argv, capsys)


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--pan-and-scan-max-crops", "1"], "--pan-and-scan-max-crops must be at least 2"),
    (["--pan-and-scan-min-crop-size", "0"], "--pan-and-scan-min-crop-size must be at least 1"),
    (["--system", "Be brief.", "--model", "GEMMA2"], "Gemma 2 has no system role"),
])
def test_chat_checks_before_loading(args, message, tiny_dir, tmp_path, capsys, monkeypatch, no_loading):
    gemma2 = tmp_path / "gemma2"
    weights.save(random_model(tiny_config(2).replace(vocab_size=VOCAB, max_seq_len=CONTEXT)), gemma2)
    args = [str(gemma2) if a == "GEMMA2" else a for a in args]
    monkeypatch.setattr(sys, "stdin", io.StringIO("the\n"))
    model = [] if "--model" in args else ["--model", str(tiny_dir)]
    assert message in _error(["chat", *model, *args], capsys)


def test_perplexity_reads_control_token_text_as_plain_text(tiny_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("the <bos> is <start_of_turn> the")
    assert main(["perplexity", str(f), "--model", str(tiny_dir)]) == 0
    scored = int(capsys.readouterr().out.split("  tokens ")[1].split()[0])
    _, tok = load(str(tiny_dir))
    assert scored != len(tok.encode(f.read_text(), add_bos=False))  # <bos> and <start_of_turn> as control tokens
    assert scored == len(tok.encode(f.read_text(), add_bos=False, parse_special=False))


# -- small things (item 13) -------------------------------------------------------------------------------

def test_perplexity_windows_refuse_a_second_bos():
    """Each window is <bos> + text: text ids that hold a <bos> would start a window with two."""
    assert windows([5, 6, 7], 3, bos_id=2) == [[2, 5, 6], [2, 7]]
    with pytest.raises(ValueError, match="hold <bos>"):
        windows([2, 5, 6, 7], 3, bos_id=2)


def test_perplexity_prints_windows_and_context(tiny_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("the thesis is in the sea and the sun is on the hill. " * 6)
    assert main(["perplexity", str(f), "--model", str(tiny_dir), "--context", "16"]) == 0
    _, tok = load(str(tiny_dir))
    n = len(tok.encode(f.read_text(), add_bos=False))
    assert f"  tokens {n}  windows {math.ceil(n / 15)}  context 16  (t.txt)\n" in capsys.readouterr().out


def test_info_refuses_context_below_1(capsys):
    assert "--context must be at least 1, got 0" in _error(["info", "gemma3-270m", "--context", "0"], capsys)
    assert "--batch must be at least 1, got 0" in _error(["info", "gemma3-270m", "--batch", "0"], capsys)


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"gemmakit {version('gemmakit')}\n"


def test_help_documents_every_argument_with_its_default():
    import argparse

    from gemmakit.cli import build_parser

    top = build_parser()
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = {"gemmakit": top, **{c: sub.choices[c] for c in ("info", "chat", "convert", "perplexity")}}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in action.help, f"{what}: the help does not say the default {action.default!r}"
    prompt = [a for a in sub.choices["generate"]._actions if a.dest == "prompt"]
    assert prompt[0].help


def _readme() -> str:
    """The README of the gemmakit that is imported (so the check follows the code under test)."""
    import gemmakit

    return (Path(gemmakit.__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def _section(readme: str, title: str) -> str:
    return readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_says_what_the_quick_start_installs():
    import re
    import tomllib

    import gemmakit

    readme = _readme()
    quick = _section(readme, "Quick start")
    run_command = re.findall(r"```bash\n(.*?)\n```", quick, re.S)[0]
    assert "pip install torch==2.13.0 -e . " in run_command  # no extra: the runtime dependencies only
    assert "Quick start command installs the test extra" not in readme
    pyproject = tomllib.loads((Path(gemmakit.__file__).parent.parent / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["optional-dependencies"]["test"]:
        package = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        assert package.lower() in quick.lower(), f"the Quick start does not say that the tests need {package}"


@pytest.mark.real
def test_readme_states_the_cache_size():
    import re

    from gemmakit import hub

    files = [hub.default_gguf(), *hub.default_checkpoint().iterdir()]
    gb = sum(f.stat().st_size for f in files) / 1e9
    stated = re.search(r"`~/.cache/gemmakit`, about ([\d.]+) GB", _readme())
    assert stated and float(stated.group(1)) == round(gb, 1), f"the cache holds {gb:.2f} GB"

