"""The Gemma tokenizer (SentencePiece BPE with byte fallback), its chat template and streaming decode.

Sources: an HF directory's `tokenizer.model` (SentencePiece) or `tokenizer.json` (tokenizers), or a
GGUF vocabulary, from which we build the SentencePiece model proto and let `sentencepiece` encode.

Matching the reference (transformers) takes two adjustments to the SentencePiece model:
- control pieces (`<bos>`, `<start_of_turn>`, ...) written literally in the text become their ids,
  as transformers' added special tokens do; SentencePiece only does that for user-defined pieces,
  so the encoding model marks control pieces user-defined (decoding still skips them);
- llama.cpp stores whitespace-run pieces with real spaces ("  "); SentencePiece matches its escaped
  form, so they are spelled with U+2581 again.

Text that a user typed or that arrived as message content is encoded with `parse_special=False`:
then no text can yield a PROTECTED id (a forged `<end_of_turn>`, a fake `<start_of_image>`); only the
chat template places those (see `chat_segments`).
"""

from __future__ import annotations

import json
import os
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from gemmakit.gguf import GGUFVocab

SPACE = "\u2581"  # SentencePiece's escaped space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
IMAGE_TOKEN = "<start_of_image>"  # what an image part of a chat message renders as (expanded by vision code)
# Pieces that plain text (parse_special=False) never yields, whatever their type in the vocabulary: the
# GGUF and tokenizer.model vocabularies make <start_of_image>/<end_of_image> USER_DEFINED, which
# SentencePiece matches inside ordinary text. Control pieces (and special added tokens) are never matched.
PROTECTED = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
             "<start_of_image>", "<end_of_image>", "<image_soft_token>")


def check_utf8(text: str, what: str = "text") -> str:
    """`text` unchanged, or ValueError "{what} is not valid UTF-8 (byte N)".

    Python turns invalid UTF-8 bytes in argv and stdin into lone surrogates (surrogateescape); N is
    the offset of the first such byte in the original bytes. Lone surrogates from elsewhere (JSON
    "\\ud800") are refused the same way.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        offset = len(text[:e.start].encode("utf-8"))  # the prefix before the first bad character is valid
        raise ValueError(f"{what} is not valid UTF-8 (byte {offset})") from None
    return text


def _spm():
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    return sentencepiece, sentencepiece_model_pb2


def spm_proto_from_vocab(vocab: GGUFVocab) -> Any:
    """A SentencePiece ModelProto equivalent to the GGUF vocabulary (types kept as the file says)."""
    _, pb = _spm()
    if vocab.model != "llama":
        raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not SentencePiece (Gemma uses 'llama')")
    m = pb.ModelProto()
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece.replace(" ", SPACE), float(score), int(kind)
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size, t.byte_fallback = len(vocab.tokens), True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id
    t.unk_piece, t.bos_piece = vocab.tokens[vocab.unk_id], vocab.tokens[vocab.bos_id]
    t.eos_piece, t.pad_piece = vocab.tokens[vocab.eos_id], vocab.tokens[vocab.pad_id]
    n = m.normalizer_spec
    # Gemma: no normalization, no dummy prefix, spaces kept as they are (escaped to U+2581).
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", False, False, True
    if vocab.add_space_prefix:
        n.add_dummy_prefix = True
    return m


class Tokenizer:
    """encode/decode plus the ids a generator needs. `add_bos` prepends `<bos>` once."""

    def __init__(self, proto: Any | None = None, tokenizer_json: str | os.PathLike | None = None,
                 add_bos: bool = True) -> None:
        self.add_bos_default = add_bos
        self._sp = self._hf = self._plain = None
        if proto is not None:
            sentencepiece, pb = _spm()
            self.proto = proto
            encoding = pb.ModelProto()
            encoding.CopyFrom(proto)
            for p in encoding.pieces:
                if p.type == CONTROL:
                    p.type = USER_DEFINED
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=encoding.SerializeToString())
            self.pieces = [p.piece for p in proto.pieces]
            self.special = {i for i, p in enumerate(proto.pieces) if p.type == CONTROL}
        elif tokenizer_json is not None:
            from tokenizers import Tokenizer as HFTokenizer

            self.proto = None
            self._hf = HFTokenizer.from_file(str(tokenizer_json))
            self._lock = threading.Lock()
            vocab = self._hf.get_vocab(with_added_tokens=True)
            self.pieces = [""] * (max(vocab.values()) + 1)
            for piece, i in vocab.items():
                self.pieces[i] = piece
            added = self._hf.get_added_tokens_decoder()
            self.special = {i for i, t in added.items() if t.special}
            # encode_special_tokens (parse_special=False) leaves only *special* added tokens to the model as
            # text; transformers adds <start_of_image>/<end_of_image> as non-special ones: mark them special
            # (that changes nothing else: decode does not use the flag, and parsing matches them either way).
            self._unmarked = [t for t in added.values() if t.content in PROTECTED and not t.special]
            self._hf.add_special_tokens(self._marked())
            self._protected_ids = {i for i, t in added.items() if t.content in PROTECTED}
        else:
            raise ValueError("Tokenizer needs a SentencePiece proto or a tokenizer.json")
        self._ids = {p: i for i, p in enumerate(self.pieces)}
        self.bos_id = self.token_id("<bos>")
        self.eos_id = self.token_id("<eos>")
        self.pad_id = self._ids.get("<pad>", 0)

    # -- construction --

    @classmethod
    def from_gguf_vocab(cls, vocab: GGUFVocab) -> Tokenizer:
        return cls(spm_proto_from_vocab(vocab), add_bos=vocab.add_bos)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """From an HF directory: tokenizer.model if present, else tokenizer.json."""
        path = Path(path)
        add_bos = True
        if (cfg := path / "tokenizer_config.json").is_file():
            add_bos = bool(json.loads(cfg.read_text()).get("add_bos_token", True))
        if (model := path / "tokenizer.model").is_file():
            _, pb = _spm()
            proto = pb.ModelProto()
            try:
                proto.ParseFromString(model.read_bytes())
            except Exception as e:
                raise ValueError(f"{model} is not a SentencePiece model ({e})") from None
            return cls(proto, add_bos=add_bos)
        if (tj := path / "tokenizer.json").is_file():
            return cls(tokenizer_json=tj, add_bos=add_bos)
        raise FileNotFoundError(f"{path} has no tokenizer.model or tokenizer.json")

    def save(self, path: str | os.PathLike, generation: int | None = None) -> None:
        """Write the tokenizer into an existing HF directory: tokenizer.model (SentencePiece) or
        tokenizer.json (a `tokenizers`-backed tokenizer), tokenizer_config.json, special_tokens_map.json.

        With the model's `generation`, tokenizer_config.json also carries Google's chat template for it
        (the one `render_chat` follows) and generation_config.json the ids Google's checkpoints list
        (bos, pad, and every stop id as eos), so transformers, vLLM and llama.cpp's converter format
        and stop chats as gemmakit does.
        """
        path = Path(path)
        if self._sp is not None:
            (path / "tokenizer.model").write_bytes(self.proto.SerializeToString())
        else:
            with self._lock:  # save the file as it was read: unmark what __init__ marked special
                self._hf.add_tokens(self._unmarked)
                try:
                    self._hf.save(str(path / "tokenizer.json"))
                finally:
                    self._hf.add_special_tokens(self._marked())
        special = {k: self.pieces[i] for k, i in
                   (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id),
                    ("unk_token", self._ids.get("<unk>", 3)))}
        config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": self.add_bos_default,
                  "add_eos_token": False, **special}
        if generation is not None:
            config["chat_template"] = chat_template(generation)
            gen = {"bos_token_id": self.bos_id, "eos_token_id": list(self.stop_ids), "pad_token_id": self.pad_id}
            (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")

    # -- ids --

    def __len__(self) -> int:
        return len(self.pieces)

    def token_id(self, piece: str) -> int:
        try:
            return self._ids[piece]
        except KeyError:
            raise ValueError(f"the vocabulary has no {piece} token") from None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """`<eos>` (pretrained models) and `<end_of_turn>` (instruction-tuned), as this vocabulary numbers them."""
        return tuple(i for i in (self._ids.get("<eos>"), self._ids.get("<end_of_turn>")) if i is not None)

    # -- text --

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with `<bos>` first if `add_bos` (default: the tokenizer's setting).

        parse_special=True (a raw prompt): literal control-token text (e.g. "<start_of_turn>") becomes
        that token, as in transformers. parse_special=False (what a user typed, message content): the
        text is plain text and never yields a PROTECTED id. Raises ValueError for text that is not
        valid UTF-8 (lone surrogates), see `check_utf8`.
        """
        check_utf8(text)
        if self._sp is None:
            ids = self._hf_encode(text, parse_special)
        else:
            ids = (self._sp if parse_special else self._plain_encoder()).encode(text)
        if self.add_bos_default if add_bos is None else add_bos:
            ids = [self.bos_id, *ids]
        return ids

    def _plain_encoder(self) -> Any:
        """The SentencePiece processor for parse_special=False, built on first use (a second copy of the
        vocabulary, ~0.3 s for Gemma 3's): the protected pieces become control pieces, never matched in text."""
        if self._plain is None:
            sentencepiece, pb = _spm()
            plain = pb.ModelProto()
            plain.CopyFrom(self.proto)
            for p in plain.pieces:
                if p.piece in PROTECTED and p.type != UNKNOWN:
                    p.type = CONTROL
            self._plain = sentencepiece.SentencePieceProcessor(model_proto=plain.SerializeToString())
        return self._plain

    def _marked(self) -> list[Any]:
        from tokenizers import AddedToken

        return [AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                           normalized=t.normalized, special=True) for t in self._unmarked]

    def _hf_encode(self, text: str, parse_special: bool) -> list[int]:
        # `tokenizers` has no per-call switch, only the encode_special_tokens attribute: set it under a lock
        # so that concurrent calls (the server's threads) never see each other's setting.
        with self._lock:
            self._hf.encode_special_tokens = not parse_special
            try:
                ids = self._hf.encode(text, add_special_tokens=False).ids
            finally:
                self._hf.encode_special_tokens = False
        if not parse_special and (forged := self._protected_ids.intersection(ids)):
            # Only BPE merges could assemble a protected piece from text; Gemma's tokenizer.json has none.
            raise ValueError(f"tokenizer.json's merges turn plain text into {self.pieces[min(forged)]}")
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 byte sequences become U+FFFD."""
        if skip_special:
            ids = [i for i in ids if i not in self.special]
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids arriving one at a time into text chunks that never split a UTF-8 character.

    Decodes the ids since the last complete chunk; while that text ends in U+FFFD (a multi-byte
    character whose remaining byte-fallback tokens have not arrived) nothing is emitted.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:  # a UTF-8 character is at most 4 bytes
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tokenizer.decode(self.pending), []
        return text


# -- chat template ---------------------------------------------------------------------------------
#
# Google's templates (gemmakit/chat_templates/, verbatim copies of the `chat_template` of the
# google/gemma-3-*-it and gemma-2-*-it tokenizer configs) written out as Python, piece by piece, so
# that what the template writes (`Special` control tokens, role names, newlines) and what the messages
# hold (plain text, never parsed for control tokens) stay apart until tokenization.

class Special(str):
    """A control token placed by the template (tokenized as its id); plain `str` segments are text."""


def chat_template(generation: int) -> str:
    """Google's Jinja chat template for instruction-tuned models of `generation` (as in their tokenizer_config.json)."""
    name = "gemma3.jinja" if generation >= 3 else "gemma.jinja"
    return resources.files("gemmakit").joinpath("chat_templates", name).read_text(encoding="utf-8")


def _content(content: Any, generation: int, where: str) -> list[str]:
    """A message's content as segments: a string (trimmed), or a list of parts {"type": "text", "text": ...}
    (each trimmed on its own, as Google's Gemma 3 template does) and {"type": "image"} (`<start_of_image>`)."""
    if isinstance(content, str):
        return [content.strip()]
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts, not {type(content).__name__}")
    out: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: a text part needs a string \"text\"")
            out.append(part["text"] if generation < 3 else part["text"].strip())
        elif kind == "image":
            if generation < 3:
                raise ValueError(f"{where}: Gemma {generation} takes no images")
            out.append(Special(IMAGE_TOKEN))
        else:
            raise ValueError(f"{where}: unknown message part type {kind!r} (use text or image)")
    # Gemma 1/2's template knows only string content: text parts are joined and trimmed as one string.
    return ["".join(out).strip()] if generation < 3 else out


def chat_segments(messages: list[dict[str, Any]], generation: int, add_generation_prompt: bool = True) -> list[str]:
    """The Gemma turn format as segments: `Special` control tokens and plain text (message content).

    Roles: "user" and "model" ("assistant" is written "model"), alternating, starting with user.
    Gemma 3 accepts a leading "system" message and puts its text (not trimmed; of a list, the first
    part's text) plus a blank line at the start of the first user turn; Gemma 1 and 2 have no system
    role. Text is trimmed as Google's templates trim it. Raises ValueError naming the bad message.
    """
    messages = list(messages)
    prefix: list[str] = []
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        if generation < 3:
            raise ValueError(f"Gemma {generation} has no system role; put the instructions in the first user turn")
        system = messages.pop(0).get("content")
        if isinstance(system, list) and system and isinstance(system[0], dict) and isinstance(system[0].get("text"), str):
            system = system[0]["text"]  # the template reads only the first part
        if not isinstance(system, str):
            raise ValueError("the system message's content must be a string or start with a text part")
        prefix = [system + "\n\n"]
    if not messages:
        raise ValueError("a chat needs at least one user message")
    out: list[str] = [Special("<bos>")]
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} is not an object with role and content")
        role = {"assistant": "model"}.get(msg.get("role"), msg.get("role"))
        if role not in ("user", "model"):
            raise ValueError(f"unknown chat role {msg.get('role')!r}; use user, model (or system first, Gemma 3)")
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            raise ValueError(f"chat turns must alternate user/model starting with user; message {i} is {role}")
        out += [Special("<start_of_turn>"), f"{role}\n", *(prefix if i == 0 else []),
                *_content(msg.get("content"), generation, f"message {i}"), Special("<end_of_turn>"), "\n"]
    if add_generation_prompt:
        if len(messages) % 2 == 0:
            raise ValueError("the last message is the model's: nothing to generate a reply to")
        out += [Special("<start_of_turn>"), "model\n"]
    return out


def render_chat(messages: list[dict[str, Any]], generation: int, add_generation_prompt: bool = True) -> str:
    """The chat as the text Google's template renders, starting with `<bos>` (for display and other
    tools; to tokenize a chat use `encode_chat`, which keeps message content plain text)."""
    return "".join(chat_segments(messages, generation, add_generation_prompt))


def encode_segments(tokenizer: Tokenizer, segments: list[str | int]) -> list[int]:
    """Ids of `segments`: each `Special` is its token id, an int is taken as an id (image soft-token
    placeholders, which may lie outside the vocabulary), and each run of adjacent text is encoded as
    one plain string (parse_special=False). That equals encoding the joined string when the text
    holds no control-token text, since control tokens split the text in either case."""
    ids: list[int] = []
    text: list[str] = []
    for s in [*segments, None]:
        if isinstance(s, str) and not isinstance(s, Special):
            text.append(s)
            continue
        if text:
            ids += tokenizer.encode("".join(text), add_bos=False, parse_special=False)
            text = []
        if isinstance(s, Special):
            ids.append(tokenizer.token_id(s))
        elif s is not None:
            ids.append(int(s))
    return ids


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], generation: int,
                add_generation_prompt: bool = True) -> list[int]:
    """Chat ids with exactly one `<bos>`; message content never becomes a control token (a typed
    "<end_of_turn>" stays text). An image part is its `<start_of_image>` id (vision.chat_prompt_ids
    expands images)."""
    return encode_segments(tokenizer, chat_segments(messages, generation, add_generation_prompt))
