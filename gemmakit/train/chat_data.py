"""Chat (SFT) data: conversations rendered in the model's turn format with a loss mask, packed whole.

Input: JSONL files, one conversation per line, in the format TRL and the OpenAI fine-tuning API use:
    {"messages": [{"role": "system"|"user"|"assistant"|"model", "content": "..." or [{"type": "text", ...}]}]}
Each conversation is rendered with the model's own template (tokenizer.chat_segments: one <bos>, then
`<start_of_turn>role\\n content <end_of_turn>\\n` per turn, Google's trimming and system-prompt rules) and
tokenized as transformers' `apply_chat_template` tokenizes it (content is plain text, never control ids).

The loss mask is 1 on the tokens the model must learn to write: from the first token after
`<start_of_turn>model\\n` through that turn's `<end_of_turn>`; 0 on everything else (<bos>, user and
system text, role names, `<start_of_turn>`, the `\\n` after `<end_of_turn>`).

A prepared chat directory holds, per split (`train`, `val`):
  {split}.tokens  uint32 ids, the conversations back to back (each starts with its own <bos>)
  {split}.mask    uint8 loss mask, one per token
  {split}.docs    uint64 start offset of each conversation, then the total length
plus meta.json ("format": "chat") and tokenizer/. A conversation longer than `seq_len` is dropped and
counted, never split: a cut conversation would teach replies without their prompt.

Packing (ChatData): rather than PackedData's stream windows, whole conversations are packed into
sequences of seq_len tokens (first-fit decreasing by length, done once when the data is opened), each
keeping its own <bos> at position 0 of its own positions, with document masking (a conversation attends
only to itself); the rest of a sequence is <pad>, attending only to itself and never a target. Every
conversation is in exactly one sequence per epoch, and every masked token is a target exactly once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gemmakit.tokenizer import Special, Tokenizer, chat_segments, encode_segments
from gemmakit.train.data import SPLITS, Batches, json_lines, load_meta, split_of
from gemmakit.train.losses import IGNORE

FORMAT = "chat"


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, Any]], generation: int) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one conversation for SFT, both of the same length.

    ids equal `encode_chat(..., add_generation_prompt=False)` (one <bos>, Google's template); mask is 1
    from the first token after each `<start_of_turn>model\\n` through that turn's `<end_of_turn>`, else 0.
    Raises ValueError for an empty conversation, one that does not end with the model's turn, image
    parts, and everything `chat_segments` refuses (unknown role, turns out of order, bad content).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty conversation: \"messages\" must be a non-empty list")
    segments = chat_segments(messages, generation, add_generation_prompt=False)
    if any(s == "<start_of_image>" and isinstance(s, Special) for s in segments):
        raise ValueError("image parts are not supported in chat SFT data")
    last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if last not in ("model", "assistant"):
        raise ValueError(f"the last message is {last!r}: a training conversation ends with the model's "
                         f"(assistant's) reply")
    # Cut the segments where the mask changes: after `<start_of_turn>` `model\n`, and after that turn's
    # `<end_of_turn>`. The pieces are tokenized apart; the check below makes sure this equals
    # tokenizing the whole (it does for Gemma's vocabularies: "\n" is a piece of its own).
    pieces: list[tuple[list[str], int]] = []
    cur: list[str] = []
    in_reply, i = False, 0
    while i < len(segments):
        s = segments[i]
        if isinstance(s, Special) and s == "<start_of_turn>" and segments[i + 1] == "model\n":
            pieces.append(([*cur, s, segments[i + 1]], 0))
            cur, in_reply, i = [], True, i + 2
            continue
        cur.append(s)
        if in_reply and isinstance(s, Special) and s == "<end_of_turn>":
            pieces.append((cur, 1))
            cur, in_reply = [], False
        i += 1
    pieces.append((cur, 0))
    ids: list[int] = []
    mask: list[int] = []
    for segs, m in pieces:
        part = encode_segments(tokenizer, segs)
        ids += part
        mask += [m] * len(part)
    if ids != encode_segments(tokenizer, segments):
        raise ValueError("the tokenizer merges a reply's first token with `model\\n`: the loss mask has no "
                         "token boundary there")
    return ids, mask


def read_conversations(inputs: list[str | Path]) -> Iterator[tuple[str, Any]]:
    """(name "path:line", parsed JSON or the ValueError that line raised) for every non-blank line of
    the .jsonl inputs (folders: every .jsonl inside, sorted). Raises for a missing or unsupported input."""
    files: list[Path] = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            found = sorted(p for p in inp.rglob("*.jsonl") if p.is_file())
            if not found:
                raise FileNotFoundError(f"{inp}: folder holds no .jsonl files")
            files += found
        elif inp.is_file():
            if inp.suffix != ".jsonl":
                raise ValueError(f"{inp}: chat data must be .jsonl (one {{\"messages\": [...]}} per line)")
            files.append(inp)
        else:
            raise FileNotFoundError(f"{inp}: no such file or folder")
    for path in files:
        for name, record in json_lines(path):
            if isinstance(record, ValueError):
                yield name, record
            elif not isinstance(record, dict) or "messages" not in record:
                yield name, ValueError("expected an object with a \"messages\" list")
            else:
                yield name, record["messages"]


def prepare_chat(inputs: list[str | Path], tokenizer: Tokenizer, generation: int, out_dir: str | Path,
                 seq_len: int, tokenizer_name: str = "", val_fraction: float = 0.1, on_error: str = "fail") -> dict:
    """Render, tokenize and mask the conversations of `inputs` into `out_dir` (see the module docstring);
    returns meta.json's contents.

    seq_len: conversations longer than this many tokens are dropped (counted in meta "dropped_too_long").
    on_error: "fail" raises ValueError "path:line: why" at the first bad line; "skip" reports each bad
    line on stderr and leaves it out (counted in meta "skipped"). The directory is built under a
    temporary name next to `out_dir` and renamed into place when complete, so a failure writes nothing;
    an existing prepared directory at `out_dir` is replaced, anything else there is refused.
    """
    from gemmakit.weights import atomic_directory, check_replaceable

    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be skip or fail, not {on_error!r}")
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    out = check_replaceable(Path(out_dir), "meta.json")
    with atomic_directory(out) as tmp:
        meta = _write_chat(inputs, tokenizer, generation, tmp, seq_len, tokenizer_name, val_fraction, on_error)
    return meta


def _write_chat(inputs, tokenizer, generation, tmp: Path, seq_len, tokenizer_name, val_fraction, on_error) -> dict:
    handles = {(s, kind): open(tmp / f"{s}.{kind}", "wb") for s in SPLITS for kind in ("tokens", "mask")}
    starts: dict[str, list[int]] = {s: [] for s in SPLITS}
    n_tokens = {s: 0 for s in SPLITS}
    n_targets = {s: 0 for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    skipped = dropped = 0
    try:
        for name, messages in read_conversations(inputs):
            try:
                if isinstance(messages, ValueError):
                    raise messages
                ids, mask = encode_conversation(tokenizer, messages, generation)
            except ValueError as e:
                if on_error == "fail":
                    raise ValueError(f"{name}: {e} (--on-error skip leaves such lines out)") from None
                print(f"gemmakit: warning: {name}: {e}; skipped", file=sys.stderr)
                skipped += 1
                continue
            if len(ids) > seq_len:
                dropped += 1
                continue
            if max(ids) >= len(tokenizer):
                raise ValueError(f"{name}: tokenizer produced ids outside [0, {len(tokenizer)})")
            split = split_of(name, val_fraction)
            starts[split].append(n_tokens[split])
            names[split].append(name)
            handles[split, "tokens"].write(np.asarray(ids, dtype=np.uint32).tobytes())
            handles[split, "mask"].write(np.asarray(mask, dtype=np.uint8).tobytes())
            n_tokens[split] += len(ids)
            n_targets[split] += sum(mask)
    finally:
        for f in handles.values():
            f.close()
    if not starts["train"] and not starts["val"]:
        raise ValueError(f"no conversation to train on ({skipped} bad lines skipped, {dropped} longer than "
                         f"--seq-len {seq_len} dropped)")
    if not starts["train"]:
        raise ValueError("every conversation landed in the validation split; lower --val-fraction")
    for s in SPLITS:
        np.asarray(starts[s] + [n_tokens[s]], dtype=np.uint64).tofile(tmp / f"{s}.docs")
    from gemmakit.train.commands import TOKENIZER_DIR

    (tmp / TOKENIZER_DIR).mkdir()
    tokenizer.save(tmp / TOKENIZER_DIR, generation=generation)
    meta = {"format": FORMAT, "tokenizer": tokenizer_name, "generation": generation, "vocab_size": len(tokenizer),
            "max_id": len(tokenizer) - 1, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
            "seq_len": seq_len, "val_fraction": val_fraction,
            "documents": {s: len(starts[s]) for s in SPLITS}, "tokens": n_tokens, "target_tokens": n_targets,
            "dropped_too_long": dropped, "skipped": skipped, "val_documents": names["val"]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def pack(lengths: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Conversation indices per sequence: first-fit decreasing (longest first, into the first sequence
    with room), each sequence's conversations then in their original order. Deterministic.
    Raises ValueError if a conversation is longer than seq_len."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"a conversation has {int(lengths.max())} tokens, more than seq_len {seq_len}")
    room = np.empty(len(lengths), dtype=np.int64)
    members: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(room[:len(members)] >= lengths[i])
        if len(fits):
            j = int(fits[0])
        else:
            j = len(members)
            members.append([])
            room[j] = seq_len
        members[j].append(int(i))
        room[j] -= lengths[i]
    return [np.sort(np.asarray(m, dtype=np.int64)) for m in members]


class ChatData(Batches):
    """Packed sequences of whole conversations (see the module docstring) from one split of a prepared
    chat directory, in a seeded order per epoch, with a resumable position: the interface of PackedData
    (next_batch, iteration for evaluation, state_dict), always with segment_ids and positions."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world: int = 1) -> None:
        """Raises FileNotFoundError for a directory that is not prepared data, ValueError for data that is not
        chat data, an empty split, or seq_len shorter than a conversation of the split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.meta = load_meta(data_dir)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{data_dir} is plain-text data, not chat data: prepare conversations with "
                             f"`gemmakit data prepare --chat`")
        d = Path(data_dir)
        self.tokens = np.memmap(d / f"{split}.tokens", dtype=np.uint32, mode="r")
        self.mask = np.memmap(d / f"{split}.mask", dtype=np.uint8, mode="r")
        self.starts = np.fromfile(d / f"{split}.docs", dtype=np.uint64).astype(np.int64)
        lengths = np.diff(self.starts)
        if len(lengths) == 0:
            raise ValueError(f"the {split} split of {data_dir} holds no conversations")
        if int(lengths.max()) > seq_len:
            raise ValueError(f"{data_dir} holds conversations of up to {int(lengths.max())} tokens, more than "
                             f"--seq-len {seq_len}; use --seq-len {int(lengths.max())} or more (the data was "
                             f"prepared with --seq-len {self.meta['seq_len']})")
        self.seq_len, self.batch_size, self.shuffle, self.seed = seq_len, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.pad = int(self.meta.get("pad", 0))
        self.sequences = pack(lengths, seq_len)
        self.n_windows = len(self.sequences)
        self._start()

    def conversations(self, idx: np.ndarray | list[int]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """(ids int64, loss mask bool) of every conversation of each of the given packed sequences, in order."""
        rows = []
        for w in idx:
            convs = []
            for c in self.sequences[int(w)]:
                a, e = int(self.starts[c]), int(self.starts[c + 1])
                convs.append((np.asarray(self.tokens[a:e], dtype=np.int64), np.asarray(self.mask[a:e], dtype=bool)))
            rows.append(convs)
        return rows

    def windows(self, idx: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """The batch of the given packed sequences: tokens, targets, segment_ids, positions [B, T] int64
        and windows [B]. targets[t] is tokens[t + 1] where that token's mask is 1 and it belongs to the
        same conversation, else IGNORE; padding is its own segment."""
        return self.layout(self.conversations(idx), idx)

    def layout(self, rows: list[list[tuple[np.ndarray, np.ndarray]]],
               idx: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """The batch (see `windows`) of rows of (ids, mask) conversations, each row at most seq_len tokens;
        `idx` are the rows' sequence indices (the batch's "windows")."""
        b, t = len(rows), self.seq_len
        tokens = np.full((b, t), self.pad, dtype=np.int64)
        targets = np.full((b, t), IGNORE, dtype=np.int64)
        segments = np.zeros((b, t), dtype=np.int64)
        positions = np.zeros((b, t), dtype=np.int64)
        for row, convs in enumerate(rows):
            at = 0
            for seg, (ids, mask) in enumerate(convs):
                n = len(ids)
                if at + n > t:
                    raise ValueError(f"conversations of {at + n} tokens do not fit a sequence of {t}")
                tokens[row, at:at + n] = ids
                targets[row, at:at + n - 1] = np.where(mask[1:], ids[1:], IGNORE)  # the last token predicts nothing
                segments[row, at:at + n] = seg
                positions[row, at:at + n] = np.arange(n)
                at += n
            segments[row, at:] = len(convs)
            positions[row, at:] = np.arange(t - at)
        return {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets),
                "segment_ids": torch.from_numpy(segments), "positions": torch.from_numpy(positions),
                "windows": torch.as_tensor(np.asarray(idx, dtype=np.int64))}
