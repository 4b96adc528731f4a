"""Training checkpoints without pickle: a directory of safetensors shards and JSON, written atomically.

    OUT/checkpoint/
      shard-0000R.safetensors   rank R's slice of every tensor (model, optimizer state)
      rank-0000R.json           rank R's own state: its RNG states, as lists and ints
      state.json                step, scheduler, optimizer hyper-parameters, data position, train config,
                                extra, world size, and the size of every file above

Each rank writes the slices it holds (FSDP2's DTensor shards; a replicated or plain tensor by rank 0 only)
with safetensors' `save_file`, which streams them to disk, and records where each slice sits in its whole
tensor in the header's metadata (DCP_SHARDING_INFO, the layout of torch.distributed.checkpoint's Hugging
Face storage). Loading is DCP's: `HuggingFaceStorageReader` rebuilds the global layout from those headers,
so any number of ranks can load the files (resharding), one process without torch.distributed included.
DCP's own `.metadata` file is a pickle: this layout neither writes nor reads it. (DCP's writer would do,
but it serializes each rank's shard to one bytes object before writing: for the 270M's 3 GB of weights
and moments that doubles the checkpoint's memory.) A single-process run writes the same layout.

Atomic: everything is written to OUT/checkpoint.tmp/, then `checkpoint` is renamed to `checkpoint.old`,
`checkpoint.tmp` to `checkpoint`, and `checkpoint.old` removed. A crash at any moment leaves one complete
checkpoint: `checkpoint`, or between the two renames `checkpoint.old` (which `find` then returns).

No pickle is ever loaded: a pickle file in the directory (DCP's `.metadata`, a torch.save file) or an
old `OUT/checkpoint.pt` is refused with a message naming it; a file whose size differs from the one
state.json records (a truncated shard) is an error naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gemmakit.train.parallel import barrier, is_distributed

CHECKPOINT = "checkpoint"
STATE = "state.json"
LEGACY = "checkpoint.pt"  # gemmakit <= 0.x: one torch.save pickle, never loaded
FORMAT = 1
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".distcp")


def _tmp(out: Path) -> Path:
    return out / (CHECKPOINT + ".tmp")


def _old(out: Path) -> Path:
    return out / (CHECKPOINT + ".old")


def find(out_dir: str | Path) -> Path | None:
    """The run directory's checkpoint: OUT/checkpoint, else OUT/checkpoint.old (a save that died between
    its two renames), else None. Raises ValueError for an old pickled OUT/checkpoint.pt."""
    out = Path(out_dir)
    for path in (out / CHECKPOINT, _old(out)):
        if path.is_dir():
            return path
    if (out / LEGACY).exists():
        raise ValueError(f"{out / LEGACY}: a pickled checkpoint of an earlier gemmakit, which is not loaded (a pickle "
                         f"can run code); start the run again with --overwrite")
    return None


def remove(out_dir: str | Path) -> None:
    """Delete the run directory's checkpoint, in every form (a fresh run must not resume an old one)."""
    out = Path(out_dir)
    for path in (out / CHECKPOINT, _tmp(out), _old(out)):
        shutil.rmtree(path, ignore_errors=True)
    (out / LEGACY).unlink(missing_ok=True)


def _is_pickle(path: Path) -> bool:
    if path.name == ".metadata" or path.suffix in _PICKLE_SUFFIXES:
        return True
    if path.is_dir() or path.suffix in (".safetensors", ".json"):  # those are parsed, never unpickled
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    # b"\x80": pickle protocol 2 or later; a zip: torch.save's format (a pickle inside)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _write_json(path: Path, obj: Any) -> None:
    try:
        text = json.dumps(obj)
    except TypeError as e:  # a tensor or another object in the state: a bug in the caller, said plainly
        raise TypeError(f"{path.name}: checkpoint state must be JSON values ({e})") from None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file or directory to the disk (a rename is only as durable as what it renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet():
    # DCP warns that it "assumes a single process" when there is no process group: that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _slices(tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The slices this rank writes, and where each starts in its whole tensor (DCP's saved_offsets)."""
    from torch.distributed.tensor import DTensor, Replicate

    mine, where = {}, {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            if all(isinstance(p, Replicate) for p in t.placements):
                t = t.to_local()  # the same on every rank: rank 0 writes it
            else:
                (chunk,) = t.__create_chunk_list__()  # FSDP2: one contiguous slice per rank
                if t.to_local().numel():  # (a rank past the end of a small tensor holds nothing)
                    mine[name], where[name] = t.to_local(), {"saved_offsets": list(chunk.offsets)}
                continue
        if rank == 0:
            mine[name], where[name] = t, {"saved_offsets": [0] * t.dim()}
    return {k: v.detach().cpu().contiguous() for k, v in mine.items()}, where


def save(out_dir: str | Path, tensors: dict[str, torch.Tensor], state: dict, rank_state: dict, rank: int = 0,
         world: int = 1) -> Path:
    """Write OUT/checkpoint atomically (see the module docstring); collective under torch.distributed:
    every rank calls it with its own `tensors` (plain tensors or FSDP2's DTensors, flat names) and
    `rank_state` (JSON values); rank 0's `state` (JSON values) goes to state.json. Returns the path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp, final, old = _tmp(out), out / CHECKPOINT, _old(out)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before its renames
        tmp.mkdir(parents=True)
    barrier()
    mine, where = _slices(tensors, rank)
    shard = tmp / f"shard-{rank:05d}.safetensors"
    save_file(mine, shard, metadata={"format": "pt", "DCP_SHARDING_INFO": json.dumps(where), "DCP_VERSION": "1.0"})
    _fsync(shard)
    _write_json(tmp / f"rank-{rank:05d}.json", rank_state)
    barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _write_json(tmp / STATE, {"format": FORMAT, "world_size": world, **state, "files": files})
        _fsync(tmp)
        if not final.exists() and old.exists():  # the previous save died between its renames
            os.rename(old, final)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(out)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _check_safetensors(path: Path, size: int) -> None:
    """The header parses and every tensor's bytes lie inside the file (a damaged shard of the right size)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        header = f.read(n) if 0 < n <= size - 8 else b""
    try:
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"{path}: not a readable safetensors shard (damaged header)") from None
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated shard: its tensors need {8 + n + end} bytes, the file has {size}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing: {path.parent} is an incomplete checkpoint") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); the checkpoint is damaged") from None


def read(out_dir: str | Path) -> dict:
    """state.json of the run directory's checkpoint (also given as OUT/checkpoint itself), after checking
    the whole directory: no pickle in it (refused, named), every file state.json lists present with its
    recorded size (a truncated shard is named), nothing else there. Raises FileNotFoundError without a
    checkpoint, ValueError for a refused or damaged one."""
    out = Path(out_dir)
    if out.name == CHECKPOINT and not (out / CHECKPOINT).is_dir():  # OUT/checkpoint given for OUT
        out = out.parent
    path = find(out)
    if path is None:
        raise FileNotFoundError(f"{out / CHECKPOINT}: no checkpoint to resume from")
    entries = sorted(path.iterdir())
    for p in entries:  # before reading anything: a pickle is refused whatever else the directory holds
        if _is_pickle(p):
            raise ValueError(f"{p}: a pickle file in a checkpoint directory; gemmakit does not load pickles (they "
                             f"can run code): refusing the checkpoint")
    state = _read_json(path / STATE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path / STATE}: not a gemmakit checkpoint of format {FORMAT}")
    files = state["files"]
    for p in entries:
        if p.name != STATE and p.name not in files:
            raise ValueError(f"{p}: not part of the checkpoint (state.json does not list it); remove it")
    for name, size in files.items():
        p = path / name
        if not p.exists():
            raise ValueError(f"{p}: missing: {path} is an incomplete checkpoint")
        if p.stat().st_size != size:
            raise ValueError(f"{p}: truncated or damaged shard ({p.stat().st_size} bytes, {size} were written)")
        if name.endswith(".safetensors"):
            _check_safetensors(p, size)
    return {**state, "path": str(path)}


def load_tensors(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (this rank's: plain or DTensors, the names `save` got) in place from the checkpoint
    `read` returned, whatever the number of ranks that wrote it (collective under torch.distributed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    with _quiet():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(state["path"]), no_dist=not is_distributed())


def read_rank_state(state: dict, rank: int) -> dict:
    """This rank's state from the checkpoint `read` returned; a rank the writing run did not have (a
    resume on more ranks) gets rank 0's."""
    r = rank if rank < int(state["world_size"]) else 0
    return _read_json(Path(state["path"]) / f"rank-{r:05d}.json")


# -- model and optimizer as flat tensors + JSON ----------------------------------------------------------

_KEEP = ("fused", "foreach", "capturable", "differentiable")  # how this run's optimizer computes, not state


def model_and_optimizer(model: nn.Module, opt: torch.optim.Optimizer, trainable_only: bool = False
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, optimizer JSON): `model.<name>` for the model's state (FSDP2: this rank's DTensor slices;
    `trainable_only`: parameters that train, and no frozen ones), `optimizer.<param name>.<field>` for each
    parameter's optimizer state (Adam's moments and step), keyed by parameter name so that any number of
    ranks maps it back; the JSON holds the param groups (hyper-parameters) and any non-tensor state.
    On an optimizer that has not stepped, the state is created (zeros: a template to load into)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=trainable_only))
    tensors = {f"model.{k}": v for k, v in msd.items()}
    scalars: dict[str, dict] = {}
    for name, fields in osd["state"].items():
        for field, v in fields.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{name}.{field}"] = v
            else:
                scalars.setdefault(name, {})[field] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def set_model_and_optimizer(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                            saved: dict, trainable_only: bool = False) -> None:
    """Load `model_and_optimizer`'s tensors (filled by `load_tensors`) and JSON back into the model and
    optimizer. The optimizer keeps its own fused/foreach choice (one process uses the fused AdamW, FSDP2
    the plain one), so a resume on another number of ranks works."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[str, dict] = {name: dict(fields) for name, fields in saved["scalars"].items()}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            name, field = k[len("optimizer."):].rsplit(".", 1)
            state.setdefault(name, {})[field] = v
    now = opt.param_groups
    if len(now) != len(saved["param_groups"]):
        raise ValueError(f"the checkpoint has {len(saved['param_groups'])} optimizer param groups, this run "
                         f"{len(now)}: not the same model")
    groups = []
    for cur, g in zip(now, saved["param_groups"]):
        g = {k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in g.items()}
        groups.append({**g, **{k: cur[k] for k in _KEEP if k in cur}})
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict={"state": state, "param_groups": groups},
                   # trainable_only: the frozen weights are missing on purpose (the keys come from this model)
                   options=StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only))


# -- RNG states as JSON ------------------------------------------------------------------------------------

def rng_state() -> dict:
    """torch's, numpy's and Python's global RNG states (and CUDA's, if present), as JSON lists and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    s = {"torch": torch.get_rng_state().tolist(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
         "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available():
        s["cuda"] = [t.tolist() for t in torch.cuda.get_rng_state_all()]
    return s


def set_rng_state(s: dict) -> None:
    """Restore `rng_state`'s states."""
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = s["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in s["cuda"]])
