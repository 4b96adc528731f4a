"""The training commands end to end on tiny models: every saved model directory carries its tokenizer
and loads into generate, perplexity and transformers; `default` names the embedded model wherever a
training command names one; an earlier run is not overwritten silently; --help gives every default."""

import argparse
import json

import pytest
import torch

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab, write_gguf
from gemmakit import cli, hub
from gemmakit.gguf import read_gguf_header
from gemmakit.tokenizer import Tokenizer

V = 320  # rows of the tiny models: tiny_vocab needs room for its 277 byte and normal pieces
TEXT = ["this is the thing", "the hat is on", "a thesis on the sea", "this is a test of the tokens"]


@pytest.fixture
def tiny(tmp_path):
    """A tiny Gemma 3 GGUF with its tokenizer, prepared data, and a matching student config."""
    write_gguf(tmp_path / "tiny.gguf", random_model(tiny_config(3).replace(vocab_size=V)), tiny_vocab(V))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i in range(6) for t in TEXT))
    (tmp_path / "student.json").write_text(json.dumps({
        "base": "gemma3-270m", "vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 1, "n_kv_heads": 1,
        "head_dim": 8, "intermediate_size": 32, "sliding_window": 4, "max_seq_len": 256}))
    (tmp_path / "text.txt").write_text("this is the hat on the sea")
    return tmp_path


def prepare(tmp, *extra):
    assert cli.main(["data", "prepare", str(tmp / "d.jsonl"), "--out", str(tmp / "data"), *extra]) == 0


COMMON = ["--seq-len", "8", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--lr", "1e-2"]


def run(tmp, cmd, out, *extra):
    return cli.main([cmd, "--data", str(tmp / "data"), "--out", str(tmp / out), *COMMON, *extra])


def assert_usable(model_dir, tmp, capsys, expect_tok: Tokenizer):
    """The directory works in generate and perplexity and loads into transformers with the same tokenizer."""
    capsys.readouterr()
    assert cli.main(["generate", "this is", "--model", str(model_dir), "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
    assert cli.main(["perplexity", str(tmp / "text.txt"), "--model", str(model_dir)]) == 0, capsys.readouterr().err
    assert Tokenizer.from_dir(model_dir).pieces == expect_tok.pieces
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert hf_tok("the hat")["input_ids"] == expect_tok.encode("the hat", add_bos=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert hf.get_input_embeddings().weight.shape[0] == V


def test_trained_models_carry_their_tokenizer(tiny, capsys):
    tok = Tokenizer.from_gguf_vocab(read_gguf_header(tiny / "tiny.gguf")[1])
    prepare(tiny, "--tokenizer", str(tiny / "tiny.gguf"))
    assert run(tiny, "train", "scratch", "--model", str(tiny / "student.json")) == 0  # random init: the data's tokenizer
    assert run(tiny, "train", "tuned", "--model", str(tiny / "tiny.gguf")) == 0  # fine-tuned: the model's
    assert run(tiny, "train", "lora", "--model", str(tiny / "tiny.gguf"), "--lora-rank", "2") == 0
    assert run(tiny, "distill", "distilled", "--model", str(tiny / "student.json"), "--teacher",
               str(tiny / "tiny.gguf")) == 0
    for name in ("scratch", "tuned", "lora", "distilled"):
        assert_usable(tiny / name / "model", tiny, capsys, tok)
    # a resumed run saves OUT/model again, tokenizer included
    assert run(tiny, "train", "scratch", "--model", str(tiny / "student.json"), "--resume") == 0
    assert (tiny / "scratch" / "model" / "tokenizer.model").is_file()
    assert cli.main(["generate", "this", "--model", str(tiny / "scratch" / "model"), "--max-new-tokens", "2"]) == 0


@pytest.fixture
def tiny_default(tiny, monkeypatch):
    """The tiny model stands in for the embedded Gemma 3 270M (a cache directory of its own)."""
    monkeypatch.setenv("GEMMAKIT_HOME", str(tiny / "home"))
    hub.convert(tiny / "tiny.gguf", hub._default_dir(), progress=False)
    return tiny


def test_default_names_the_embedded_model_in_every_training_command(tiny_default, capsys):
    tmp = tiny_default
    prepare(tmp)  # no --tokenizer: the embedded model's
    first = (tmp / "data" / "train.tokens").read_bytes()
    assert json.loads((tmp / "data" / "meta.json").read_text())["tokenizer"] == "default"
    prepare(tmp, "--tokenizer", "default")
    assert (tmp / "data" / "train.tokens").read_bytes() == first
    assert run(tmp, "train", "tuned", "--model", "default") == 0
    assert_usable(tmp / "tuned" / "model", tmp, capsys, Tokenizer.from_dir(hub._default_dir()))
    for i, teacher in enumerate(([], ["--teacher", "default"])):
        assert cli.main(["teacher-cache", *teacher, "--data", str(tmp / "data"), "--out", str(tmp / f"c{i}"),
                         "--k", "8", "--seq-len", "8"]) == 0
        assert json.loads((tmp / f"c{i}" / "meta.json").read_text())["teacher"] == "default"
    assert (tmp / "c0" / "ids.u32").read_bytes() == (tmp / "c1" / "ids.u32").read_bytes()
    assert run(tmp, "distill", "online", "--model", str(tmp / "student.json"), "--teacher", "default") == 0
    assert run(tmp, "distill", "cached", "--model", "default", "--teacher-cache", str(tmp / "c0")) == 0
    parsers = _training_parsers()
    for name, flag in (("train", "--model"), ("distill", "--model"), ("distill", "--teacher"),
                       ("teacher-cache", "--teacher"), ("data prepare", "--tokenizer")):
        assert "`default`" in _help_of(parsers[name], flag), (name, flag)


def _training_parsers() -> dict[str, argparse.ArgumentParser]:
    subs = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    data = next(a for a in subs["data"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"data prepare": data["prepare"], "train": subs["train"], "teacher-cache": subs["teacher-cache"],
            "distill": subs["distill"], "sft": subs["sft"]}


def _help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    return parser._option_string_actions[flag].help


def test_help_gives_every_training_default():
    for name, parser in _training_parsers().items():
        one_of = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for a in parser._actions:
            if not a.option_strings or a.required or id(a) in one_of or a.help == argparse.SUPPRESS or a.nargs == 0:
                continue  # positionals, required options, --help/--debug and on/off switches
            assert "default" in (a.help or ""), f"{name} {a.option_strings[0]}: no default in {a.help!r}"
            if a.default not in (None, argparse.SUPPRESS):  # SUPPRESS: the top-level option's value stands
                assert str(a.default) in a.help, f"{name} {a.option_strings[0]}: {a.default} not in {a.help!r}"


def test_existing_out_is_not_overwritten_and_resume_checks_settings(tiny, capsys):
    prepare(tiny, "--tokenizer", str(tiny / "tiny.gguf"))
    student = ["--model", str(tiny / "student.json")]
    assert run(tiny, "train", "r", *student) == 0
    log = (tiny / "r" / "log.jsonl").read_text()
    ck = {p.name: p.read_bytes() for p in (tiny / "r" / "checkpoint").iterdir()}
    capsys.readouterr()
    assert run(tiny, "train", "r", *student, "--lr", "5e-3") == 1
    err = capsys.readouterr().err
    assert "already holds a training run (checkpoint, log.jsonl, model)" in err and "--overwrite" in err
    assert (tiny / "r" / "log.jsonl").read_text() == log
    assert {p.name: p.read_bytes() for p in (tiny / "r" / "checkpoint").iterdir()} == ck
    # --resume with a longer run: the cosine schedule was laid out over 2 steps
    assert run(tiny, "train", "r", *student, "--resume", "--steps", "4") == 1
    err = capsys.readouterr().err
    assert "steps 2 -> 4 (the cosine schedule" in err and err.count("\n") == 1
    assert run(tiny, "train", "r", *student, "--resume", "--lora-rank", "2") == 1
    assert "lora_rank 0 -> 2" in capsys.readouterr().err
    assert run(tiny, "distill", "r", *student, "--resume", "--teacher", str(tiny / "tiny.gguf")) == 1
    assert "objective cross_entropy -> full" in capsys.readouterr().err
    # harmless changes are said and accepted
    assert run(tiny, "train", "r", *student, "--resume", "--eval-every", "1", "--ckpt-every", "5") == 0
    err = capsys.readouterr().err
    assert "resuming with a changed setting: ckpt_every 100 -> 5" in err and "eval_every 0 -> 1" in err
    assert run(tiny, "train", "r", *student, "--overwrite", "--lr", "5e-3") == 0
    assert json.loads((tiny / "r" / "log.jsonl").read_text().splitlines()[0])["lr"] != json.loads(log.splitlines()[0])["lr"]
    assert run(tiny, "train", "new", *student, "--resume") == 1
    assert "no checkpoint to resume from" in capsys.readouterr().err
