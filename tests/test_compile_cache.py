"""The compiled decode step across processes (gemmakit.compiled): built once into gemmakit's cache, loaded
by the next process without compiling anything, rebuilt after a one-line notice when corrupt. Whole
`gemmakit generate` processes on a tiny model, with gemmakit's and inductor's caches in a temporary
folder (never a warm ~/.cache left by earlier runs)."""

import argparse
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
from gemmakit.tokenizer import Tokenizer

PROMPT, N = "the thesis", 8
NOTE = "gemmakit: compiling the decode step for this model, once: ~"
# Runs the command, then prints inductor's own counters (what this process compiled) as JSON on stderr.
DRIVER = ("import json, sys; from gemmakit.cli import main; code = main(sys.argv[1:]); "
          "from torch._dynamo.utils import counters; "
          "print('COUNTERS ' + json.dumps({k: dict(v) for k, v in counters.items() if v}), file=sys.stderr); "
          "sys.exit(code)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The smallest model that still has every part: Gemma 1, 2 layers, a 300-piece vocabulary."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    weights.save(random_model(tiny_config(1).replace(vocab_size=300, max_seq_len=64), seed=5), path)
    Tokenizer.from_gguf_vocab(tiny_vocab(300)).save(path)
    return path


def _generate(tiny_dir, home, *extra) -> tuple[str, list[str], dict]:
    """A `gemmakit generate` process: (stdout, stderr lines without the counters, counters)."""
    env = {**os.environ, "GEMMAKIT_HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor")}
    argv = ["generate", PROMPT, "--model", str(tiny_dir), "--max-new-tokens", str(N), "--threads", "1", *extra]
    r = subprocess.run([sys.executable, "-c", DRIVER, *argv], env=env, capture_output=True, text=True,
                       cwd=home, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    counters = json.loads(lines[-1].removeprefix("COUNTERS "))
    return r.stdout, lines[:-1], counters


@pytest.fixture(scope="module")
def two_runs(tiny_dir, tmp_path_factory):
    """The same command twice, in a fresh cache: (home, first run, second run)."""
    home = tmp_path_factory.mktemp("home")
    first = _generate(tiny_dir, home, "--compile")
    return home, first, _generate(tiny_dir, home, "--compile")


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_step_and_compiles_nothing(two_runs, tiny_dir, capsys):
    home, (out1, err1, counters1), (out2, err2, counters2) = two_runs
    # The first process compiled, saying so once; the second found the package and compiled nothing:
    # no dynamo frame, no AOT autograd, no inductor graph (not even a cache hit: nothing was traced).
    assert [line for line in err1 if line.startswith(NOTE)] == err1 and len(err1) == 1, err1
    assert counters1.get("inductor"), counters1
    assert err2 == [] and not {k: v for k, v in counters2.items() if k in ("inductor", "aot_autograd", "stats")}, counters2
    assert len(list((home / "compile").glob("*/step.pt2"))) == 1
    # Compiled and eager decoding print the same text (greedy tokens).
    assert main(["generate", PROMPT, "--model", str(tiny_dir), "--max-new-tokens", str(N), "--no-compile"]) == 0
    eager = capsys.readouterr().out
    assert out1 == out2 == eager and len(eager) > len(PROMPT) + 1


@pytest.mark.slow
def test_a_corrupt_compiled_step_is_rebuilt_with_a_one_line_notice(two_runs, tiny_dir):
    home, (out1, _, _), _ = two_runs
    (package,) = (home / "compile").glob("*/step.pt2")
    data = bytearray(package.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)  # a damaged stretch in the middle of the library
    package.write_bytes(bytes(data))
    out, err, _ = _generate(tiny_dir, home, "--compile")
    notices = [line for line in err if not line.startswith(NOTE)]
    assert len(notices) == 1 and "cannot be used" in notices[0] and "rebuilding it" in notices[0], err
    assert out == out1
    assert _generate(tiny_dir, home, "--compile")[1] == []  # the rebuilt package loads quietly


def test_no_compile_takes_the_eager_path_and_compile_the_compiled_one(tiny_dir, capsys, monkeypatch):
    # The command line's choice reaches engine.generate, for generate and for chat (each reply).
    from gemmakit import engine

    calls = []

    def spy(model, cache, token, pos):
        calls.append(token.shape)
        return None  # "cannot compile here": the engine decodes eagerly

    monkeypatch.setattr(engine, "compiled_step", spy)
    argv = ["--model", str(tiny_dir), "--max-new-tokens", "3"]
    assert main(["generate", PROMPT, *argv, "--no-compile"]) == 0
    assert main(["generate", PROMPT, *argv]) == 0  # a tiny model: below COMPILE_MIN_PARAMS, eager by default
    assert calls == []
    assert main(["generate", PROMPT, *argv, "--compile"]) == 0
    assert calls == [(1, 1)]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\nagain\n"), encoding="utf-8"))
    assert main(["chat", *argv, "--compile"]) == 0
    assert calls == [(1, 1)] * 3
    capsys.readouterr()


def test_compile_min_params_keeps_every_published_gemma_compiled():
    from gemmakit.cli import COMPILE_MIN_PARAMS
    from gemmakit.config import CONFIGS

    assert min(sum(c.param_counts().values()) for c in CONFIGS.values()) >= COMPILE_MIN_PARAMS
    assert sum(tiny_config(1).param_counts().values()) < COMPILE_MIN_PARAMS


def test_threads_option_sets_torchs_threads_on_every_command(capsys):
    from gemmakit.cli import build_parser

    before = torch.get_num_threads()
    try:
        assert main(["info", "gemma3-1b", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["--threads", "2", "info", "gemma3-1b"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(["info", "gemma3-1b", "--threads", "0"]) == 1
    assert capsys.readouterr().err == "gemmakit: error: --threads must be at least 1, got 0\n"
    # Every subcommand takes it, training ones included.
    def subparsers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield name, sub
                    yield from subparsers(sub)

    subs = dict(subparsers(build_parser()))
    assert {"generate", "chat", "perplexity", "train", "distill", "teacher-cache", "prepare", "convert"} <= set(subs)
    assert [name for name, sub in subs.items() if "--threads" not in sub._option_string_actions] == []
    assert build_parser().parse_args(["convert", "a", "b", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["convert", "a", "b"]).threads is None
