"""Token shards on disk and a loader of packed fixed-length training sequences.

A prepared directory holds, per split (`train`, `val`):
  {split}.tokens   uint32 token ids, every document written as <bos> text <eos>, back to back
  {split}.docs     uint64 start offset of each document in {split}.tokens, then the total length
and meta.json (tokenizer, vocabulary size, largest id, counts, invalid UTF-8 replacements); `gemmakit
data prepare` also keeps a copy of its tokenizer in tokenizer/ (a model trained from scratch on the data
is saved with it). Both token files are plain arrays read with np.memmap, so a corpus larger than memory
costs nothing to open.

Documents are assigned to a split by a hash of their name (file path, or path:line for JSONL), so the
split is deterministic and does not change when other documents are added.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from gemmakit.train.losses import IGNORE

# <eos> and <bos> are 1 and 2 in every Gemma tokenizer (1, 2 and 3).
EOS, BOS = 1, 2
SPLITS = ("train", "val")


@dataclass
class Document:
    name: str
    text: str
    invalid_utf8: int  # byte sequences that were not UTF-8 and became U+FFFD


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 with invalid sequences replaced by U+FFFD; also returns how many were replaced."""
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


def _files(inputs: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            found = sorted(p for p in inp.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
            if not found:
                raise FileNotFoundError(f"{inp}: folder holds no .txt or .jsonl files")
            out += found
        elif inp.is_file():
            if inp.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"{inp}: unsupported input (expected .txt, .jsonl or a folder)")
            out.append(inp)
        else:
            raise FileNotFoundError(f"{inp}: no such file or folder")
    return out


def read_documents(inputs: list[str | Path]) -> Iterator[Document]:
    """Documents of the inputs in a fixed order: a .txt file is one document, a .jsonl line is one
    (its `text` field); folders are searched recursively in sorted order."""
    for path in _files(inputs):
        if path.suffix == ".txt":
            text, bad = _decode(path.read_bytes())
            yield Document(str(path), text, bad)
            continue
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line, bad = _decode(raw)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
                yield Document(f"{path}:{lineno}", record["text"], bad)


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """("path:line", the parsed JSON value, or the ValueError saying why the line is not JSON) for every
    non-blank line of a strict UTF-8 JSONL file; the caller decides whether a bad line skips or fails."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                value = ValueError(f"not valid UTF-8 (byte {e.start})")
            except json.JSONDecodeError as e:
                value = ValueError(f"not valid JSON ({e.msg})")
            yield f"{path}:{lineno}", value


def _file_of(name: str) -> str:
    """The file a document came from (JSONL documents are named path:line)."""
    head, _, tail = name.rpartition(":")
    return head if head and tail.isdigit() and head.endswith(".jsonl") else name


def split_of(name: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def prepare(inputs: list[str | Path], encode: Callable[[str], list[int]], out_dir: str | Path,
            vocab_size: int, tokenizer_name: str = "", val_fraction: float = 0.1, bos: int = BOS, eos: int = EOS,
            val_files: list[str] | None = None) -> dict:
    """Tokenize `inputs` into `out_dir` (see the module docstring); returns the meta.json contents.

    `encode(text)` must return the ids of the text as plain text (no <bos>/<eos> or other control
    ids: a document that says "<bos>" is text); <bos> and <eos> are added here around every document,
    and an encoder that yields them inside a document is an error.
    `val_files`: file names (e.g. "hamlet.txt") whose documents form the validation split instead of
    the hash-based `val_fraction`.
    Files are written under temporary names and renamed when complete; meta.json comes last.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = list(read_documents(inputs))
    if not docs:
        raise ValueError("no documents found in the inputs")
    if val_files:
        names = {Path(_file_of(d.name)).name for d in docs}
        if missing := set(val_files) - names:
            raise ValueError(f"--val-files not among the inputs: {sorted(missing)}")
        splits = ["val" if Path(_file_of(d.name)).name in val_files else "train" for d in docs]
    else:
        splits = [split_of(d.name, val_fraction) for d in docs]
    if not val_files and val_fraction > 0 and len(docs) > 1 and "val" not in splits:
        # Tiny corpora: hold out the document with the smallest hash rather than none.
        i = min(range(len(docs)), key=lambda j: hashlib.sha256(docs[j].name.encode()).digest())
        splits[i] = "val"
    if "train" not in splits:
        raise ValueError("every document landed in the validation split; lower --val-fraction")

    handles = {s: open(out / f"{s}.tokens.tmp", "wb") for s in SPLITS}
    starts: dict[str, list[int]] = {s: [] for s in SPLITS}
    n_tokens = {s: 0 for s in SPLITS}
    invalid = max_id = 0
    try:
        for doc, split in tqdm(list(zip(docs, splits)), desc="tokenizing", unit="doc"):
            body = encode(doc.text)
            if bos in body or eos in body:
                raise ValueError(f"{doc.name}: the tokenizer produced <bos>/<eos> ids inside the text; "
                                 f"encode documents as plain text")
            ids = [bos, *body, eos]
            if max(ids) >= vocab_size or min(ids) < 0:
                raise ValueError(f"{doc.name}: tokenizer produced ids outside [0, {vocab_size})")
            max_id = max(max_id, *ids)
            starts[split].append(n_tokens[split])
            handles[split].write(np.asarray(ids, dtype=np.uint32).tobytes())
            n_tokens[split] += len(ids)
            invalid += doc.invalid_utf8
    finally:
        for f in handles.values():
            f.close()
    for s in SPLITS:
        offsets = np.asarray(starts[s] + [n_tokens[s]], dtype=np.uint64)
        offsets.tofile(out / f"{s}.docs.tmp")
        os.replace(out / f"{s}.tokens.tmp", out / f"{s}.tokens")
        os.replace(out / f"{s}.docs.tmp", out / f"{s}.docs")
    meta = {
        "tokenizer": tokenizer_name, "vocab_size": vocab_size, "max_id": max_id, "bos": bos, "eos": eos, "val_fraction": val_fraction,
        "documents": {s: len(starts[s]) for s in SPLITS}, "tokens": n_tokens,
        "invalid_utf8_replaced": invalid,
        "val_documents": [d.name for d, s in zip(docs, splits) if s == "val"],
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    return meta


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{data_dir}: not a prepared data directory (no meta.json); "
                                f"run `gemmakit data prepare` first")
    return json.loads(path.read_text())


class Batches:
    """A split's sequences in a seeded order per epoch, with a resumable position, for the trainer.

    A subclass sets n_windows, batch_size, shuffle, seed, rank, world, then calls `_start()`, and
    implements `windows(idx)`: the batch of the given sequence indices.
    """

    n_windows: int
    batch_size: int
    shuffle: bool
    seed: int
    rank: int
    world: int

    def _start(self) -> None:
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def windows(self, idx: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_windows, generator=g).numpy()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch_size windows in this epoch's order; wraps into the next epoch.

        With `world` > 1 ranks, every rank draws the same batch_size * world windows and keeps its
        slice, so the global batch is the one a single process with batch_size * world would see."""
        idx: list[int] = []
        while len(idx) < self.batch_size * self.world:
            if self.pos == self.n_windows:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size * self.world - len(idx), self.n_windows - self.pos)
            idx += self._order[self.pos: self.pos + take].tolist()
            self.pos += take
        return self.windows(idx[self.rank * self.batch_size: (self.rank + 1) * self.batch_size])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the split in order (for evaluation), the last batch possibly smaller."""
        for start in range(0, self.n_windows, self.batch_size):
            yield self.windows(list(range(start, min(start + self.batch_size, self.n_windows))))


class PackedData(Batches):
    """Packed fixed-length sequences from one split, in a seeded order, with a resumable position.

    The split's token stream s is its documents back to back, each `<bos> text <eos>`. For T = seq_len,
    window w owns the T stream positions a = wT, ..., wT + T - 1 (the last len(s) mod T positions belong
    to no window); its sequence is
        if s[a] is not <bos> (the window starts inside a document):
            tokens  = <bos>, s[a], ..., s[a + T - 2]
            targets = s[a], ..., s[a + T - 1]
        if s[a] is <bos> (the window starts at a document start, which has its own <bos>):
            tokens  = s[a], s[a + 1], ..., s[a + T - 1]          (= <bos>, text...)
            targets = s[a + 1], ..., s[a + T - 1], IGNORE
    So every sequence has exactly one <bos> at position 0, and a document that starts a window has its
    text at position 1, as at inference. Every stream position is the target of exactly one window
    per epoch (the one that owns it), except a <bos>: it is given, never predicted (its target is
    IGNORE). In the second case the last input's target, s[a + T], is owned by window w + 1 and so is
    IGNORE here. Documents run into each other (`... <eos> <bos> text ...`). With `mask_documents`
    each sequence also gets segment_ids (tokens attend only inside their own document; a prepended
    <bos> joins the first document) and positions that restart at 0 at every document's <bos>
    (the first document of a sequence counts from its position 0), and a document's last token is not
    trained to predict the next document's start.

    WINDOW_FORMAT numbers this definition; a teacher cache records it (its rows are per window input).
    """

    WINDOW_FORMAT = 2  # 1: every window got a <bos> prepended, even before a document's own <bos>

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int,
                 mask_documents: bool = False, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world: int = 1, max_windows: int | None = None) -> None:
        """`max_windows`: use only the first windows of the split (e.g. those a bounded teacher cache
        covers). Raises FileNotFoundError for a directory that is not prepared data, ValueError for a
        split too short for one window."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.meta = load_meta(data_dir)
        if self.meta.get("format") == "chat":  # its loss mask would be ignored: every token trained on
            raise ValueError(f"{data_dir} is chat data (with a loss mask): train on it with `gemmakit sft`")
        self.bos = int(self.meta.get("bos", BOS))
        self.tokens = np.memmap(Path(data_dir) / f"{split}.tokens", dtype=np.uint32, mode="r")
        self.doc_starts = np.fromfile(Path(data_dir) / f"{split}.docs", dtype=np.uint64).astype(np.int64)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.mask_documents, self.shuffle, self.seed = mask_documents, shuffle, seed
        self.rank, self.world = rank, world
        self.n_windows = len(self.tokens) // seq_len
        if max_windows is not None:
            self.n_windows = min(self.n_windows, max_windows)
        if self.n_windows < 1:
            raise ValueError(f"{split} split has {len(self.tokens)} tokens: too few for seq_len {seq_len}")
        self._start()

    def windows(self, idx: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """The batch made of the given window indices (see the class docstring): tokens, targets [B, T]
        int64, windows [B], and with mask_documents segment_ids and positions [B, T]."""
        t, n = self.seq_len, len(self.tokens)
        idx = np.asarray(idx, dtype=np.int64)
        start = idx * t
        shift = (np.asarray(self.tokens[start], dtype=np.int64) == self.bos).astype(np.int64)
        tgt_pos = (start + shift)[:, None] + np.arange(t)[None, :]  # stream position of each target
        in_pos = tgt_pos - 1  # of each input; column 0 is <bos> (the stream's own when shift, else prepended)
        tokens = np.asarray(self.tokens[np.clip(in_pos, 0, n - 1)], dtype=np.int64)
        tokens[:, 0] = self.bos
        targets = np.asarray(self.tokens[np.clip(tgt_pos, 0, n - 1)], dtype=np.int64)
        targets[tgt_pos >= (start + t)[:, None]] = IGNORE  # owned by the next window
        if self.mask_documents:
            in_pos[:, 0] = tgt_pos[:, 0]  # the leading <bos> belongs to the document of the first target
            doc_in = np.searchsorted(self.doc_starts, in_pos, side="right") - 1
            doc_tgt = np.searchsorted(self.doc_starts, np.minimum(tgt_pos, n - 1), side="right") - 1
            positions = in_pos - self.doc_starts[doc_in]
            # The document the window starts in is seen from the leading <bos> on: count from 0.
            first = doc_in == doc_in[:, :1]
            positions[first] = np.broadcast_to(np.arange(t), positions.shape)[first]
            targets[doc_tgt != doc_in] = IGNORE
        targets[targets == self.bos] = IGNORE
        batch = {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets),
                 "windows": torch.from_numpy(idx)}
        if self.mask_documents:
            batch["segment_ids"] = torch.from_numpy(doc_in)
            batch["positions"] = torch.from_numpy(positions)
        return batch
