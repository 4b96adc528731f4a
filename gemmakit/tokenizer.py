"""The Gemma tokenizer (SentencePiece BPE with byte fallback), its chat template and streaming decode.

Sources: an HF directory's `tokenizer.model` (SentencePiece) or `tokenizer.json` (tokenizers), or a
GGUF vocabulary, from which we build the SentencePiece model proto and let `sentencepiece` encode.

Matching the reference (transformers) takes two adjustments to the SentencePiece model:
- control pieces (`<bos>`, `<start_of_turn>`, ...) written literally in the text become their ids,
  as transformers' added special tokens do; SentencePiece only does that for user-defined pieces,
  so the encoding model marks control pieces user-defined (decoding still skips them);
- llama.cpp stores whitespace-run pieces with real spaces ("  "); SentencePiece matches its escaped
  form, so they are spelled with U+2581 again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gemmakit.gguf import GGUFVocab

SPACE = "\u2581"  # SentencePiece's escaped space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
IMAGE_TOKEN = "<start_of_image>"  # what an image part of a chat message renders as (expanded by vision code)


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
        self._sp = self._hf = None
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
            vocab = self._hf.get_vocab(with_added_tokens=True)
            self.pieces = [""] * (max(vocab.values()) + 1)
            for piece, i in vocab.items():
                self.pieces[i] = piece
            self.special = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
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

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.model + tokenizer_config.json into an (existing) HF directory."""
        if self.proto is None:
            raise ValueError("only a SentencePiece tokenizer can be saved as tokenizer.model")
        path = Path(path)
        (path / "tokenizer.model").write_bytes(self.proto.SerializeToString())
        special = {k: self.pieces[i] for k, i in
                   (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id),
                    ("unk_token", self._ids.get("<unk>", 3)))}
        config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": self.add_bos_default,
                  "add_eos_token": False, **special}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

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

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; literal control-token text (e.g. "<start_of_turn>") becomes that token."""
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if self.add_bos_default if add_bos is None else add_bos:
            ids = [self.bos_id, *ids]
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

def _content_text(content: str | list[dict[str, Any]]) -> str:
    """A message's content: a string, or a list of parts {"type": "text", "text": ...} / {"type": "image"}."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.get("type") == "text":
            out.append(part["text"])
        elif part.get("type") == "image":
            out.append(IMAGE_TOKEN)
        else:
            raise ValueError(f"unknown message part type {part.get('type')!r}")
    return "".join(out)


def render_chat(messages: list[dict[str, Any]], generation: int, add_generation_prompt: bool = True) -> str:
    """The Gemma turn format as text, starting with `<bos>` (encode it with add_bos=False).

    Roles: "user" and "model" ("assistant" is accepted for "model"), alternating, starting with user.
    Gemma 3 accepts a leading "system" message and puts its text plus a blank line at the start of
    the first user turn; Gemma 1 and 2 have no system role.
    """
    messages = list(messages)
    prefix = ""
    if messages and messages[0].get("role") == "system":
        if generation < 3:
            raise ValueError(f"Gemma {generation} has no system role; put the instructions in the first user turn")
        prefix = _content_text(messages.pop(0)["content"]) + "\n\n"
    if not messages:
        raise ValueError("a chat needs at least one user message")
    out = ["<bos>"]
    for i, msg in enumerate(messages):
        role = {"assistant": "model"}.get(msg.get("role"), msg.get("role"))
        if role not in ("user", "model"):
            raise ValueError(f"unknown chat role {msg.get('role')!r}; use user, model (or system first, Gemma 3)")
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            raise ValueError(f"chat turns must alternate user/model starting with user; message {i} is {role}")
        text = _content_text(msg["content"]).strip()
        if i == 0:
            text = prefix + text
        out.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        if len(messages) % 2 == 0:
            raise ValueError("the last message is the model's: nothing to generate a reply to")
        out.append("<start_of_turn>model\n")
    return "".join(out)


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], generation: int) -> list[int]:
    """Chat ids with exactly one `<bos>` (the template writes it; encoding adds none)."""
    return tokenizer.encode(render_chat(messages, generation), add_bos=False)
