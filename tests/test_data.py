"""Token shards and packed sequences: layout on disk, determinism, invalid UTF-8, splits, packing,
document masking (a packed sequence equals its documents run separately)."""

import json

import numpy as np
import pytest
import torch

from gemmakit.config import get_config
from gemmakit.model import build
from gemmakit.train import data as D
from gemmakit.train.losses import IGNORE

VOCAB = 300


def encode(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]  # a byte tokenizer that keeps 0-2 for specials


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello world")
    (src / "sub" / "b.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe ok \xef\xbf\xbd")  # 2 invalid bytes, 1 real U+FFFD
    (src / "c.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    return src


def test_prepare_layout_utf8_and_determinism(corpus, tmp_path):
    m1 = D.prepare([corpus], encode, tmp_path / "o1", VOCAB, "bytes", val_fraction=0.0)
    m2 = D.prepare([corpus], encode, tmp_path / "o2", VOCAB, "bytes", val_fraction=0.0)
    assert m1 == m2
    for f in ("train.tokens", "train.docs", "val.tokens"):
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes()
    assert m1["documents"] == {"train": 4, "val": 0}
    assert m1["invalid_utf8_replaced"] == 2
    toks = np.fromfile(tmp_path / "o1" / "train.tokens", dtype=np.uint32)
    starts = np.fromfile(tmp_path / "o1" / "train.docs", dtype=np.uint64)
    texts = ["hello world", "first doc", "second", "café \ufffd\ufffd ok \ufffd"]  # sorted: a.txt, c.jsonl, sub/b.txt
    expect = [t for x in texts for t in [D.BOS, *encode(x), D.EOS]]
    assert toks.tolist() == expect
    assert starts.tolist() == np.cumsum([0] + [len(encode(x)) + 2 for x in texts]).tolist()
    assert not list((tmp_path / "o1").glob("*.tmp"))


def test_split_by_document_is_deterministic_and_disjoint(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(200)))
    meta = D.prepare([src], encode, tmp_path / "o", VOCAB, val_fraction=0.25)
    n_val = meta["documents"]["val"]
    assert 30 < n_val < 70 and meta["documents"]["train"] == 200 - n_val
    assert meta["val_documents"] == [f"{src}:{i + 1}" for i in range(200) if D.split_of(f"{src}:{i + 1}", 0.25) == "val"]
    val = np.fromfile(tmp_path / "o" / "val.tokens", dtype=np.uint32)
    assert (val == D.BOS).sum() == n_val


def test_prepare_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.prepare([tmp_path / "missing.txt"], encode, tmp_path / "o", VOCAB)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        D.prepare([bad], encode, tmp_path / "o", VOCAB)
    bad.write_text('{"body": "no text"}\n')
    with pytest.raises(ValueError, match="string 'text' field"):
        D.prepare([bad], encode, tmp_path / "o", VOCAB)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported input"):
        D.prepare([tmp_path / "x.csv"], encode, tmp_path / "o", VOCAB)
    with pytest.raises(FileNotFoundError, match="data prepare"):
        D.PackedData(tmp_path / "nothing", "train", 4, 1)


@pytest.fixture
def prepared(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": "ab" * (i % 5 + 1)}) + "\n" for i in range(40)))
    D.prepare([src], encode, tmp_path / "o", VOCAB, val_fraction=0.0)
    return tmp_path / "o"


def expected_window(stream, w, t):
    """Window w as the PackedData docstring defines it: (tokens, targets, stream position of each target)."""
    a = w * t
    if stream[a] == D.BOS:  # a document starts the window: its own <bos> is the window's
        tokens, pos = stream[a:a + t].tolist(), list(range(a + 1, a + t)) + [None]
    else:
        tokens, pos = [D.BOS] + stream[a:a + t - 1].tolist(), list(range(a, a + t))
    targets = [IGNORE if p is None or stream[p] == D.BOS else int(stream[p]) for p in pos]
    return tokens, targets, [p for p, y in zip(pos, targets) if y != IGNORE]


def test_windows_cover_the_stream_once_and_order_resumes(prepared):
    stream = np.fromfile(prepared / "train.tokens", dtype=np.uint32).astype(np.int64)
    d = D.PackedData(prepared, "train", seq_len=8, batch_size=3, seed=1)
    seen, predicted = [], []
    while d.epoch == 0:
        b = d.next_batch()
        for w, x, y in zip(b["windows"].tolist(), b["tokens"], b["targets"]):
            tokens, targets, pos = expected_window(stream, w, 8)
            assert x.tolist() == tokens and y.tolist() == targets
            if d.epoch == 0 or len(seen) < d.n_windows:
                predicted += pos
            seen.append(w)
    # the last batch of the epoch wraps into epoch 1; every window of epoch 0 came exactly once, and
    # with them every stream position but the <bos>es was predicted exactly once
    assert sorted(seen[: d.n_windows]) == list(range(d.n_windows))
    owned = np.arange(d.n_windows * 8)
    assert sorted(predicted) == owned[stream[owned] != D.BOS].tolist()
    state = d.state_dict()
    rest = [d.next_batch()["windows"].tolist() for _ in range(5)]
    d2 = D.PackedData(prepared, "train", seq_len=8, batch_size=3, seed=1)
    d2.load_state_dict(state)
    assert [d2.next_batch()["windows"].tolist() for _ in range(5)] == rest
    d3 = D.PackedData(prepared, "train", seq_len=8, batch_size=3, seed=2)
    assert [d3.next_batch()["windows"].tolist() for _ in range(3)] != [rest[0], rest[1], rest[2]]


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("seq_len", [2, 3, 5, 8, 16])
def test_one_bos_per_window_text_at_position_1(prepared, seq_len, mask):
    # Documents of 4-12 bytes: windows start at document starts, inside documents and at an <eos>.
    stream = np.fromfile(prepared / "train.tokens", dtype=np.uint32).astype(np.int64)
    d = D.PackedData(prepared, "train", seq_len, 4, mask_documents=mask, shuffle=False)
    b = d.windows(range(d.n_windows))
    tok, tgt = b["tokens"], b["targets"]
    assert (tok[:, 0] == D.BOS).all() and (tok[:, 1] != D.BOS).all()  # one <bos>, never two in a row
    assert not (tgt == D.BOS).any()
    starts = [w for w in range(d.n_windows) if stream[w * seq_len] == D.BOS]
    assert starts and all(tok[w, 1] == stream[w * seq_len + 1] for w in starts)  # the text at position 1
    predicted = [p for w in range(d.n_windows) for p in expected_window(stream, w, seq_len)[2]]
    if mask:  # a document's last token does not predict the next one's start: its <bos> (ignored anyway)
        assert (b["positions"][:, 0] == 0).all() and (b["positions"][tok == D.BOS] == 0).all()
        assert (b["positions"][:, 1:][tok[:, :-1] == D.BOS] == 1).all()  # after every <bos>: position 1
        assert (b["segment_ids"][:, 0] == b["segment_ids"][:, 1]).all()
    assert len(predicted) == len(set(predicted)) == int((tgt != IGNORE).sum())
    owned = np.arange(d.n_windows * seq_len)
    assert sorted(predicted) == owned[stream[owned] != D.BOS].tolist()


def test_prepare_encodes_documents_as_plain_text(tmp_path):
    from gguf_files import tiny_vocab, write_gguf
    from conftest import random_model, tiny_config
    from gemmakit import cli
    from gemmakit.tokenizer import Tokenizer

    vocab = tiny_vocab(320)
    write_gguf(tmp_path / "t.gguf", random_model(tiny_config(3).replace(vocab_size=320)), vocab)
    text = "<bos>the <start_of_turn>model\n<eos>is"
    (tmp_path / "a.txt").write_text(text)
    assert cli.main(["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "t.gguf"),
                     "--out", str(tmp_path / "o"), "--val-fraction", "0"]) == 0
    toks = np.fromfile(tmp_path / "o" / "train.tokens", dtype=np.uint32).tolist()
    tok = Tokenizer.from_gguf_vocab(vocab)
    assert toks == [2, *tok.encode(text, add_bos=False, parse_special=False), 1]
    assert toks.count(2) == 1 and toks.count(1) == 1 and 5 not in toks  # no control id from the text
    assert tok.decode(toks[1:-1]) == text
    with pytest.raises(ValueError, match="a.txt: the tokenizer produced <bos>/<eos> ids inside the text"):
        # val_fraction 0: with the default, the one document's split follows a hash of its temporary path
        D.prepare([tmp_path / "a.txt"], lambda t: tok.encode(t, add_bos=False), tmp_path / "o2", 320, val_fraction=0.0)


def test_document_masking_equals_separate_documents(prepared):
    d = D.PackedData(prepared, "train", seq_len=16, batch_size=2, mask_documents=True, shuffle=False)
    b = d.windows([1, 2])
    seg, pos, tok, tgt = b["segment_ids"], b["positions"], b["tokens"], b["targets"]
    stream = np.fromfile(prepared / "train.tokens", dtype=np.uint32).astype(np.int64)
    raw = torch.from_numpy(np.stack([stream[16:32], stream[32:48]]))
    # a document's last token (<eos>) is not trained to predict the next document's <bos>
    assert ((raw == D.BOS) == (tgt == IGNORE)).all() and (tgt == IGNORE).any()
    assert (tok[:, 0] == D.BOS).all() and (pos[:, 0] == 0).all()
    assert (pos[:, 1:][tok[:, 1:] == D.BOS] == 0).all()  # documents starting inside the window count from 0
    assert (seg[:, 0] == seg[:, 1]).all()  # the leading <bos> belongs to the first document
    cfg = get_config("gemma3-270m").replace(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                            head_dim=16, intermediate_size=64, sliding_window=4,
                                            layer_types=("local", "global"))
    torch.manual_seed(0)
    m = build(cfg, "cpu")
    m.init_weights(std=0.3)
    with torch.no_grad():
        packed = m.hidden(tok, pos, segment_ids=seg)
        unmasked = m.hidden(tok)
        for r in range(2):
            for s in seg[r].unique():
                cols = (seg[r] == s).nonzero().flatten()
                alone = m.hidden(tok[r, cols][None], pos[r, cols][None])
                torch.testing.assert_close(packed[r, cols], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed, unmasked, atol=1e-3)  # the mask matters for this data


@pytest.mark.real
def test_cli_data_prepare_with_the_gemma_tokenizer(tmp_path, capsys):
    from gemmakit import cli
    from gemmakit.train.commands import load_tokenizer

    (tmp_path / "a.txt").write_bytes(b"To be, or not to be\xff")
    assert cli.main(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--val-fraction", "0"]) == 0
    tok = load_tokenizer(None)
    toks = np.fromfile(tmp_path / "o" / "train.tokens", dtype=np.uint32)
    assert toks.tolist() == [2, *tok.encode("To be, or not to be\ufffd", add_bos=False), 1]
    assert "1 invalid UTF-8" in capsys.readouterr().err
    assert cli.main(["data", "prepare", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "none.txt: no such file or folder" in capsys.readouterr().err


LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,"]


@pytest.mark.real
@pytest.mark.parametrize("mask", [False, True])
def test_gemma_windows_have_one_bos_and_the_text_at_position_1(tmp_path, mask):
    from gemmakit import cli
    from gemmakit.train.commands import load_tokenizer

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES))
    assert cli.main(["data", "prepare", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"),
                     "--val-fraction", "0"]) == 0
    tok = load_tokenizer(None)
    b = D.PackedData(tmp_path / "o", "train", 16, 1, mask_documents=mask, shuffle=False).windows([0])
    docs = [tok.encode(t, add_bos=False) for t in LINES]
    assert docs[0][:2] == [2021, 577]  # "To", " be"
    stream = [i for d in docs for i in (2, *d, 1)]
    assert b["tokens"][0].tolist() == stream[:16]  # was [2, 2, 2021, 577, ...]
    n = len(docs[0]) + 2  # the first document with its <bos> and <eos>
    # every text token and <eos> is a target; the next document's <bos> is not, nor the 17th token
    # (the next window's); with masking the first document's <eos> does not predict across documents
    want = [IGNORE if i == 2 else i for i in stream[1:16]] + [IGNORE]
    assert b["targets"][0].tolist() == want
    if mask:
        assert b["positions"][0].tolist() == list(range(n)) + list(range(16 - n))
        assert b["segment_ids"][0].tolist() == [0] * n + [1] * (16 - n)


@pytest.mark.real
def test_real_model_prefers_one_bos(real_model):
    model, tok = real_model
    ids = tok.encode(" ".join(LINES * 4), add_bos=False)[:120]
    nll = {}
    for n_bos in (1, 2):
        x = torch.tensor([[tok.bos_id] * n_bos + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0, n_bos - 1:-1].float(), -1)
        nll[n_bos] = float(-logp.gather(1, torch.tensor(ids)[:, None]).mean())
    assert nll[1] < nll[2]
