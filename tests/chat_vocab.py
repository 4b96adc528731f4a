"""Tiny Gemma 3-style tokenizers for the tokenizer, chat-template and checkpoint tests, in both backends.

The pieces that matter for chats are typed as in the real Gemma 3 vocabulary (tokenizer.model and the
GGUF): `<pad>` `<eos>` `<bos>` `<mask>` and the turn markers are control pieces; `<start_of_image>`,
`<end_of_image>` and newline runs are user-defined pieces, which SentencePiece matches inside text.
`<image_soft_token>` is user-defined here too (the worst case: the 4B+ tokenizer.json has it special).
"""

from __future__ import annotations

from pathlib import Path

from gguf_files import tiny_vocab
from gemmakit.gguf import GGUFVocab
from gemmakit.tokenizer import Tokenizer

SIZE = 400
EXTRA = {110: "<start_of_image>", 111: "<end_of_image>", 112: "<image_soft_token>", 113: "\n\n", 114: "\n\n\n"}
BACKENDS = ["sentencepiece", "tokenizers"]
# What no message content may yield (issue 13, item 4); literal here, so the tests state the rule.
PROTECTED = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
             "<end_of_image>", "<image_soft_token>"]


def gemma3_vocab() -> GGUFVocab:
    """tiny_vocab with Gemma 3's turn ids (105, 106), the image pieces and newline runs (user-defined)."""
    v = tiny_vocab(SIZE, turn_ids=(105, 106))
    for i, piece in EXTRA.items():
        v.tokens[i], v.types[i] = piece, 4
    return v


def tokenizer(backend: str, tmp: Path) -> Tokenizer:
    """The tiny Gemma 3 tokenizer read through SentencePiece, or through `tokenizers` from the
    tokenizer.json transformers writes for it (as a transformers-saved checkpoint has it)."""
    spm = Tokenizer.from_gguf_vocab(gemma3_vocab())
    if backend == "sentencepiece":
        return spm
    import transformers

    (tmp / "spm").mkdir(parents=True, exist_ok=True)
    spm.save(tmp / "spm")
    transformers.AutoTokenizer.from_pretrained(str(tmp / "spm")).save_pretrained(str(tmp / "json"))
    assert not (tmp / "json" / "tokenizer.model").exists()
    return Tokenizer.from_dir(tmp / "json")


def protected_ids(tok: Tokenizer) -> dict[str, int]:
    return {p: tok.token_id(p) for p in PROTECTED if p in tok._ids}
