"""Chat SFT: conversations rendered as Google's template renders them, a loss mask on the model turns only,
bad lines named by file:line, long conversations dropped whole, packing with document masking, and
`gemmakit sft` from JSONL to a model directory that `gemmakit chat` runs."""

import io
import json
import sys

import numpy as np
import pytest

from chat_vocab import SIZE, gemma3_vocab
from conftest import random_model, tiny_config
from test_chat_template import GEMMA3_CHATS
from gemmakit import cli, weights
from gemmakit.tokenizer import Tokenizer
from gemmakit.train.chat_data import ChatData, encode_conversation, pack, prepare_chat
from gemmakit.train.data import PackedData
from gemmakit.train.losses import IGNORE

BOS, SOT, EOT, NL = 2, 105, 106, 379  # the tiny Gemma 3 vocabulary's <bos>, turn markers and "\n"
USER = [240, 385, 383, 237]  # "user" (u, r by byte fallback)
MODEL = [232, 387, 223, 383, 231]  # "model"


def user(c):
    return {"role": "user", "content": c}


def reply(c, role="assistant"):
    return {"role": role, "content": c}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_vocab(gemma3_vocab())


def test_two_turn_conversation_literal_ids_and_mask(tok):
    """<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\nthe<end_of_turn>\\n: the mask is 1 on
    `the` and its <end_of_turn>, 0 on everything else, the final "\\n" included."""
    ids, mask = encode_conversation(tok, [user("Hi"), reply(" the\n")], 3)
    assert ids == [BOS, SOT, *USER, NL, 195, 386, EOT, NL, SOT, *MODEL, NL, 389, 383, EOT, NL]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    ids, mask = encode_conversation(tok, [user("Hi"), reply("the"), user("is"), reply(" a ", role="model")], 3)
    assert [i for i, m in zip(ids, mask) if m] == [389, 383, EOT, 384, EOT]  # "the", "a", each with its turn's end
    assert ids[-1] == NL and mask[-1] == 0


# The template table of test_chat_template without images, ending with a model turn, plus more turns.
TRAIN_CHATS = [m + ([] if not g else [reply(" ok ")]) for m, g in GEMMA3_CHATS if "image" not in json.dumps(m)] + [
    [{"role": "system", "content": "Be brief."}, user("Hi"), reply("Hello"), user([{"type": "text", "text": " Q "}]),
     reply([{"type": "text", "text": "A"}, {"type": "text", "text": " B "}])],
    [user("x"), reply("")],
]


def test_rendering_equals_transformers_apply_chat_template_and_mask_covers_the_replies(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path, generation=3)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in TRAIN_CHATS:
        want = ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        ids, mask = encode_conversation(tok, messages, 3)
        assert ids == list(want), messages
        # each run of 1s is one reply: its text (trimmed as the template trims it) then <end_of_turn>
        runs, cur = [], []
        for i, m in zip(ids + [0], mask + [0]):
            if m:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        replies = [m for m in messages if m["role"] in ("assistant", "model")]
        assert len(runs) == len(replies), messages
        for run, r in zip(runs, replies):
            c = r["content"]
            text = c.strip() if isinstance(c, str) else "".join(p["text"].strip() for p in c)
            assert tok.decode(run, skip_special=False) == text + "<end_of_turn>"


BAD = [
    ("{not json", "not valid JSON"),
    (json.dumps({"messages": [user("a"), {"role": "robot", "content": "b"}]}), "unknown chat role 'robot'"),
    (json.dumps({"messages": [user("a"), user("b"), reply("c")]}), "must alternate"),
    (json.dumps({"messages": []}), "empty conversation"),
    (json.dumps({"messages": [user("a")]}), "ends with the model"),
    (json.dumps({"text": "plain"}), "\"messages\" list"),
]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = [json.dumps({"messages": [user(f"Hi {i}"), reply(f"the {i}")]}) for i in range(12)]


@pytest.mark.parametrize("line, why", BAD)
def test_bad_line_fails_naming_file_and_line_and_writes_nothing(tok, tmp_path, line, why):
    src = _write(tmp_path / "c.jsonl", [GOOD[0], "", line, GOOD[1]])
    with pytest.raises(ValueError, match=rf"c\.jsonl:3: .*{why}"):
        prepare_chat([src], tok, 3, tmp_path / "out", seq_len=64)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]


def test_bad_lines_skipped_are_reported_and_counted(tok, tmp_path, capsys):
    src = _write(tmp_path / "c.jsonl", GOOD[:6] + [line for line, _ in BAD] + GOOD[6:])
    meta = prepare_chat([src], tok, 3, tmp_path / "out", seq_len=64, on_error="skip", val_fraction=0.2)
    err = capsys.readouterr().err
    for n in range(7, 7 + len(BAD)):
        assert f"c.jsonl:{n}: " in err
    assert meta["skipped"] == len(BAD) and sum(meta["documents"].values()) == len(GOOD)


def test_long_conversations_are_dropped_whole_and_counted(tok, tmp_path):
    long = json.dumps({"messages": [user("the " * 40), reply("is")]})
    src = _write(tmp_path / "c.jsonl", GOOD + [long, long])
    meta = prepare_chat([src], tok, 3, tmp_path / "out", seq_len=40, val_fraction=0.0)
    assert meta["dropped_too_long"] == 2 and meta["documents"]["train"] == len(GOOD)
    lengths = np.diff(np.fromfile(tmp_path / "out" / "train.docs", dtype=np.uint64).astype(np.int64))
    assert lengths.max() <= 40
    # a loader asked for shorter sequences than a conversation refuses, rather than cutting it
    with pytest.raises(ValueError, match="more than --seq-len 10"):
        ChatData(tmp_path / "out", "train", 10, 2)


def test_packing_keeps_conversations_whole_with_document_masking(tok, tmp_path):
    chats = [[user("Hi " * (i % 4)), reply("the " * (1 + i % 3)), user("is"), reply("a")] for i in range(15)]
    src = _write(tmp_path / "c.jsonl", [json.dumps({"messages": m}) for m in chats])
    prepare_chat([src], tok, 3, tmp_path / "out", seq_len=128, val_fraction=0.0)
    data = ChatData(tmp_path / "out", "train", 128, 3, shuffle=False)
    assert data.n_windows < len(chats)  # several conversations share a sequence
    encoded = {tuple(ids): mask for ids, mask in (encode_conversation(tok, m, 3) for m in chats)}
    seen, n_targets = [], 0
    for batch in data:
        for tokens, targets, seg, pos in zip(batch["tokens"], batch["targets"], batch["segment_ids"], batch["positions"]):
            for s in seg.unique():
                where = (seg == s).nonzero().flatten()
                part = tokens[where].tolist()
                assert pos[where].tolist() == list(range(len(part)))  # positions restart in each segment
                if part[0] != BOS:  # padding: its own segment, never a target
                    assert set(part) == {tok.pad_id} and (targets[where] == IGNORE).all()
                    continue
                seen.append(tuple(part))
                ids, mask = part, encoded[tuple(part)]
                expect = [i if m else IGNORE for i, m in zip(ids[1:], mask[1:])] + [IGNORE]
                assert targets[where].tolist() == expect
                n_targets += sum(mask)
    assert sorted(seen) == sorted(tuple(encode_conversation(tok, m, 3)[0]) for m in chats)  # each once, whole
    assert n_targets == sum(sum(encode_conversation(tok, m, 3)[1]) for m in chats)
    assert [len(s) for s in pack(np.array([5, 3, 4, 2]), 7)] == [2, 2]  # first-fit decreasing: 5+2, 4+3


def test_plain_and_chat_loaders_refuse_each_others_data(tok, tmp_path):
    src = _write(tmp_path / "c.jsonl", GOOD)
    prepare_chat([src], tok, 3, tmp_path / "chat", seq_len=64, val_fraction=0.0)
    with pytest.raises(ValueError, match="is chat data .*`gemmakit sft`"):
        PackedData(tmp_path / "chat", "train", 8, 2)
    from gemmakit.train.data import prepare

    # val_fraction 0: the one document's split hangs on a hash of its (temporary) path, val 1 time in 10
    prepare([_write(tmp_path / "t.txt", ["plain text"])], lambda t: [b + 3 for b in t.encode()], tmp_path / "plain", 300,
            val_fraction=0.0)
    with pytest.raises(ValueError, match="data prepare --chat"):
        ChatData(tmp_path / "plain", "train", 8, 2)


@pytest.fixture
def tiny_chat_model(tmp_path, tok):
    path = tmp_path / "base"
    weights.save(random_model(tiny_config(3).replace(vocab_size=SIZE, max_seq_len=256), seed=3), path, tokenizer=tok)
    chats = [[user(f"What is {i}?"), reply(f"It is the {i}.")] for i in range(30)]
    _write(tmp_path / "chats.jsonl", [json.dumps({"messages": m}) for m in chats] + ["{broken"])
    return path


def test_cli_sft_from_jsonl_to_chat(tmp_path, tiny_chat_model, capsys, monkeypatch):
    base, data, run = str(tiny_chat_model), str(tmp_path / "data"), tmp_path / "run"
    prep = ["data", "prepare", "--chat", str(tmp_path / "chats.jsonl"), "--tokenizer", base, "--out", data]
    assert cli.main([*prep, "--seq-len", "64"]) == 1  # the broken last line stops it, naming file:line
    assert "chats.jsonl:31: not valid JSON" in capsys.readouterr().err and not (tmp_path / "data").exists()
    assert cli.main([*prep, "--seq-len", "64", "--on-error", "skip", "--val-fraction", "0.2"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["skipped"] == 1 and meta["documents"]["val"] > 0
    sft = ["sft", "--model", base, "--data", data, "--out", str(run), "--batch-size", "2", "--steps", "3",
           "--warmup", "1", "--lr", "1e-2", "--lora-rank", "2"]
    assert cli.main(sft) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["val_loss"] is not None and report["adapter"] == str(run / "adapter")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and "val_loss" in log[-1]
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert "chat_template" in json.loads((run / "model" / "tokenizer_config.json").read_text())
    # an earlier run is not overwritten; --resume with another --steps is refused
    assert cli.main(sft) == 1 and "--overwrite" in capsys.readouterr().err
    assert cli.main([*sft[:-2], "--steps", "4", "--resume"]) == 1
    assert "steps 3 -> 4" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 3?\n"))
    assert cli.main(["chat", "--model", str(run / "model"), "--max-new-tokens", "3"]) == 0


def test_sft_trains_only_on_the_replies(tok, tmp_path):
    """The targets (what the cross-entropy counts) are exactly the masked tokens: the replies and their
    <end_of_turn>, never the user's text, the template's tokens or <bos>."""
    src = _write(tmp_path / "c.jsonl", GOOD)
    prepare_chat([src], tok, 3, tmp_path / "out", seq_len=64, val_fraction=0.0)
    data = ChatData(tmp_path / "out", "train", 64, 4, shuffle=False)
    targets = [t for batch in data for t in batch["targets"][batch["targets"] != IGNORE].tolist()]
    replies = [encode_conversation(tok, json.loads(g)["messages"], 3) for g in GOOD]
    assert sorted(targets) == sorted(i for ids, m in replies for i, k in zip(ids, m) if k)
    assert EOT in targets and not {SOT, BOS, NL} & set(targets)
