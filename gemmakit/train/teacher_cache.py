"""Offline teacher for sampled-logit distillation: run the teacher once, keep k sampled ids per token.

A cache directory holds, for every input position of every window of the training split (seq_len
rows per window, row i = the teacher's next-token distribution after input i of the window as
data.PackedData builds it; `window_format` in meta.json names that definition):
  ids.u32     uint32 [positions, k]  token ids sampled from the teacher without replacement
  probs.f16   fp16   [positions, k]  the teacher's probabilities at those ids (renormalized at use)
  meta.json   what the cache was built from (teacher, data, seq_len, k, ...); checked before use
  progress.json  windows finished so far: an interrupted run continues from there
At k = 256 that is 1.5 KB per token (k x 6 bytes) instead of 1 MB of fp32 logits; `max_tokens` caches
only the first windows of the split (a distillation run from the cache then trains on those only).
The ids are the teacher's: with a teacher vocabulary larger than the student's (Gemma 3 4B+ has
262,208 rows, 1B/270M 262,144), sampled ids past the student's are dropped at use (see distill.py).

Each window is sampled with its own generator (seed, window), so the cache does not depend on the
batch size or on where a run was interrupted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gemmakit.train.data import PackedData, load_meta
from gemmakit.train.losses import sample_teacher


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def build_teacher_cache(teacher: torch.nn.Module, data_dir: str | Path, out_dir: str | Path, k: int = 256,
                        seq_len: int = 256, batch_size: int = 4, mask_documents: bool = False,
                        seed: int = 0, temperature: float = 1.0, teacher_name: str = "",
                        bf16: bool = False, chunk: int = 256, max_tokens: int | None = None) -> dict:
    """Fill (or finish) the cache in out_dir; returns its meta. See the module docstring.

    `max_tokens`: cache only the first max_tokens // seq_len windows (None: the whole split).
    Raises ValueError for data whose ids the teacher does not have, a bad k or max_tokens, or an
    out_dir holding a cache built with other settings or an older window layout."""
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"--max-tokens {max_tokens} is less than one sequence of --seq-len {seq_len}")
    out = Path(out_dir)
    data = PackedData(data_dir, "train", seq_len, batch_size, mask_documents, shuffle=False,
                      max_windows=None if max_tokens is None else max_tokens // seq_len)
    vocab = teacher.config.vocab_size
    max_id = int(data.meta.get("max_id", data.meta["vocab_size"] - 1))
    if max_id >= vocab:
        raise ValueError(f"data was tokenized for a vocabulary of {data.meta['vocab_size']} (ids up to {max_id}), "
                         f"the teacher has {vocab} rows: tokenize with the teacher's tokenizer")
    if not 0 < k <= vocab:
        raise ValueError(f"k = {k} must be in [1, {vocab}]")
    n_pos = data.n_windows * seq_len
    meta = {"teacher": teacher_name, "vocab_size": vocab, "k": k, "seq_len": seq_len,
            "mask_documents": mask_documents, "seed": seed, "temperature": temperature,
            "train_tokens": int(data.meta["tokens"]["train"]), "windows": data.n_windows, "positions": n_pos,
            "window_format": PackedData.WINDOW_FORMAT}
    progress = out / "progress.json"
    done = 0
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").exists():
        old = json.loads((out / "meta.json").read_text())
        _check_window_format(old, out)
        if old != meta:
            diff = {key: (old.get(key), v) for key, v in meta.items() if old.get(key) != v}
            raise ValueError(f"{out} holds a cache built with other settings {diff}; use another --out")
        done = json.loads(progress.read_text())["windows_done"] if progress.exists() else 0
    else:
        _write_json(out / "meta.json", meta)
    mode = "r+" if done and (out / "ids.u32").exists() else "w+"
    ids_mm = np.memmap(out / "ids.u32", dtype=np.uint32, mode=mode, shape=(n_pos, k))
    probs_mm = np.memmap(out / "probs.f16", dtype=np.float16, mode=mode, shape=(n_pos, k))

    teacher.eval()
    bar = tqdm(total=data.n_windows, initial=done, desc="teacher cache", unit="seq")
    with torch.no_grad():
        for start in range(done, data.n_windows, batch_size):
            windows = list(range(start, min(start + batch_size, data.n_windows)))
            batch = data.windows(windows)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                h = teacher.hidden(batch["tokens"], batch.get("positions"), segment_ids=batch.get("segment_ids"))
            for b, w in enumerate(windows):
                g = torch.Generator().manual_seed(seed * 1_000_003 + w)
                for c in range(0, seq_len, chunk):  # bounded memory: chunk x vocab fp32 logits at a time
                    logits = teacher.logits(h[b, c:c + chunk].float())
                    ids, probs = sample_teacher(logits, k, g, temperature)
                    rows = slice(w * seq_len + c, w * seq_len + c + len(ids))
                    ids_mm[rows] = ids.numpy().astype(np.uint32)
                    probs_mm[rows] = probs.numpy().astype(np.float16)
            ids_mm.flush()
            probs_mm.flush()
            _write_json(progress, {"windows_done": windows[-1] + 1})
            bar.update(len(windows))
    bar.close()
    return meta


def _check_window_format(meta: dict, where: Path) -> None:
    if meta.get("window_format", 1) != PackedData.WINDOW_FORMAT:
        raise ValueError(f"{where}: teacher cache built for an older sequence layout (window format "
                         f"{meta.get('window_format', 1)}, now {PackedData.WINDOW_FORMAT}: a second <bos> started "
                         f"sequences at a document start); its rows do not match today's sequences: rebuild it "
                         f"with `gemmakit teacher-cache` into a new --out")


class TeacherCache:
    """Read side: the sampled ids and probabilities of a batch's windows."""

    def __init__(self, cache_dir: str | Path) -> None:
        d = Path(cache_dir)
        if not (d / "meta.json").exists():
            raise FileNotFoundError(f"{d}: not a teacher cache (no meta.json); run `gemmakit teacher-cache`")
        self.meta = json.loads((d / "meta.json").read_text())
        _check_window_format(self.meta, d)
        done = json.loads((d / "progress.json").read_text())["windows_done"] if (d / "progress.json").exists() else 0
        if done < self.meta["windows"]:
            raise ValueError(f"{d}: teacher cache is incomplete ({done}/{self.meta['windows']} sequences); "
                             f"rerun `gemmakit teacher-cache` with the same arguments to finish it")
        shape = (self.meta["positions"], self.meta["k"])
        self.ids = np.memmap(d / "ids.u32", dtype=np.uint32, mode="r", shape=shape)
        self.probs = np.memmap(d / "probs.f16", dtype=np.float16, mode="r", shape=shape)

    def check(self, data_dir: str | Path, seq_len: int, mask_documents: bool, vocab_size: int) -> None:
        """Refuse a cache that does not line up with this training run (data, sequence layout, a student
        vocabulary of `vocab_size` rows that is not a prefix of the teacher's)."""
        from gemmakit.train.distill import check_vocab

        m = self.meta
        tokens = int(load_meta(data_dir)["tokens"]["train"])
        check_vocab(vocab_size, m["vocab_size"])
        if m["train_tokens"] != tokens:
            raise ValueError(f"teacher cache was built on {m['train_tokens']} training tokens, the data has {tokens}")
        if m["seq_len"] != seq_len or m["mask_documents"] != mask_documents:
            raise ValueError(f"teacher cache was built with seq_len {m['seq_len']}, mask_documents "
                             f"{m['mask_documents']}; train with the same settings")

    def lookup(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, T, k] int64, probs [B, T, k] fp32) for window indices [B]."""
        t = self.meta["seq_len"]
        rows = [slice(int(w) * t, int(w) * t + t) for w in windows]
        ids = np.stack([self.ids[r] for r in rows]).astype(np.int64)
        probs = np.stack([self.probs[r] for r in rows]).astype(np.float32)
        return torch.from_numpy(ids), torch.from_numpy(probs)
