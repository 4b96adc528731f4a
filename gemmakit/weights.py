"""HF-format checkpoints: config.json plus safetensors (one file or sharded), read and written strictly.

Only safetensors is ever read (no pickle). gemmakit's module names equal the HF keys, so loading is
`sanitize` (checkpoint names -> ours) followed by one strict `load_state_dict`; every mismatch is
reported at once, before anything is assigned. Saving writes a temporary directory next to the
target and renames it into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from gemmakit.config import Config, from_hf, to_hf
from gemmakit.model import Gemma, build

if TYPE_CHECKING:  # only for the type hint: the tokenizer sits above weights in the import order
    from gemmakit.tokenizer import Tokenizer

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
EMBED = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"

# Files worth fetching from the hub: never the pickled *.bin / *.pth copies some repos also carry.
_HUB_FILES = [CONFIG, INDEX, "*.safetensors", "generation_config.json", "tokenizer*", "special_tokens_map.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# Checkpoint key prefix -> gemmakit prefix, first match wins. Text-only checkpoints (GemmaForCausalLM,
# Gemma2ForCausalLM, Gemma3ForCausalLM) already use our names; wrapped models add their prefixes here
# (Gemma3ForConditionalGeneration: `model.language_model.`, `language_model.model.`, vision tower, projector).
_RENAMES: list[tuple[str, str]] = [
    ("model.language_model.", "model."),  # transformers 5 in memory
    ("language_model.model.", "model."),  # Google's published Gemma 3 4B/12B/27B (and transformers 5 on disk)
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),  # already ours: keep before the next rule
    ("vision_tower.", "vision_tower.vision_model."),  # transformers 5 drops `vision_model.` when saving
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names each offending file or tensor."""


def resolve(path: str | os.PathLike) -> Path:
    """A local path as is; otherwise a Hugging Face hub repo id, downloaded (safetensors only) to the HF cache."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if not _REPO_ID.fullmatch(str(path)):
        raise FileNotFoundError(f"{path}: no such file or directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, no such repo, gated repo, ...: one line naming both readings of `path`
        raise FileNotFoundError(f"{path}: not a local path, and fetching it from the Hugging Face hub failed "
                                f"({type(e).__name__}: {' '.join(str(e).split())})") from e


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike) -> Config:
    """The Config of an HF checkpoint directory (its config.json, either transformers form)."""
    p = resolve(path)
    if not (p / CONFIG).is_file():
        raise FileNotFoundError(f"{p}: no {CONFIG} in this directory (not an HF checkpoint)")
    return from_hf(_read_json(p / CONFIG), name=str(path))


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:  # truncated, corrupt header, not safetensors at all
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of `model.safetensors`, of the shards listed in `model.safetensors.index.json`,
    or of one given .safetensors file, under the checkpoint's own names."""
    p = resolve(path)
    index = None
    if p.is_file():
        files = [p]
    elif (p / SINGLE).is_file():
        files = [p / SINGLE]
    elif (p / INDEX).is_file():
        index = _read_json(p / INDEX).get("weight_map")
        if not isinstance(index, dict) or not index:
            raise CheckpointError(f"{p / INDEX}: no weight_map")
        files = [p / name for name in sorted(set(index.values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{p / INDEX} lists shards that do not exist: {', '.join(missing)}")
    else:
        raise FileNotFoundError(f"{p}: neither {SINGLE} nor {INDEX} found")

    state: dict[str, Tensor] = {}
    where: dict[str, str] = {}
    for file in tqdm(files, desc="reading shards", disable=len(files) < 3):
        for key, tensor in _read_safetensors(file).items():
            if key in state:
                raise CheckpointError(f"tensor {key} appears in both {where[key]} and {file.name}")
            state[key], where[key] = tensor, file.name
    if index is not None:  # the index must describe the shards exactly, or it is not this checkpoint
        wrong = sorted(k for k in index.keys() | where.keys() if index.get(k) != where.get(k))
        if wrong:
            raise CheckpointError(f"{p / INDEX} does not match its shards for: " + ", ".join(
                f"{k} (index: {index.get(k, 'absent')}, found in: {where.get(k, 'no shard')})" for k in wrong))
    return state


def sanitize(state_dict: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Checkpoint names -> gemmakit names: apply `_RENAMES`, drop the tied LM head."""
    out: dict[str, Tensor] = {}
    # A text-only config keeps vision keys as they are, so "unexpected vision_tower..." names them.
    renames = _RENAMES if config.vision is not None else [r for r in _RENAMES if "vision" not in r[0]]
    for key, tensor in state_dict.items():
        new = next((n + key[len(o):] for o, n in renames if key.startswith(o)), key)
        if new in out:
            raise CheckpointError(f"two checkpoint tensors map to {new}")
        out[new] = tensor
    # Gemma ties the LM head to the embedding. Some writers store the copy anyway: accept it only if
    # it really is the embedding, since gemmakit has nowhere else to put it.
    head = out.pop(TIED_HEAD, None)
    if head is not None:
        embed = out.get(EMBED)
        if embed is None or head.shape != embed.shape or not torch.equal(head, embed.to(head.dtype)):
            raise CheckpointError(f"{TIED_HEAD} differs from {EMBED}; {config.name} ties them, so this "
                                  "checkpoint holds a different model")
    return out


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Raise one CheckpointError listing every missing, unexpected, wrongly shaped or non-float tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for key in sorted(expected.keys() | state_dict.keys()):
        want = expected.get(key)
        got = tuple(state_dict[key].shape) if key in state_dict else None
        if got is None:
            problems.append(f"missing {key} (expected shape {list(want)})")
        elif want is None:
            problems.append(f"unexpected {key} (shape {list(got)})")
        elif want != got:
            problems.append(f"wrong shape {key}: expected {list(want)}, found {list(got)}")
        elif not state_dict[key].is_floating_point():
            problems.append(f"wrong dtype {key}: {state_dict[key].dtype} (quantized checkpoints load elsewhere)")
    if problems:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise CheckpointError(f"checkpoint does not fit {name} ({len(problems)} problems):\n  " + "\n  ".join(problems))


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Gemma:
    """Gemma from an HF checkpoint directory or hub repo id; strict: all tensors present, nothing extra."""
    p = resolve(path)
    config = load_config(p).replace(name=str(path))
    model = build(config, "meta", dtype)  # shapes only; also refuses float16
    state = sanitize(load_state_dict(p), config)
    check_state_dict(model, state)
    for key in state:  # cast one tensor at a time so peak memory stays near one copy of the weights
        state[key] = state[key].to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished `new` to `target`; an existing target is moved aside first and removed last."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old)


def check_replaceable(target: Path, marker: str) -> Path:
    """`target` if a directory may be written there: absent, empty, or one of the same kind (it holds
    `marker`, e.g. config.json), which is replaced. Raises FileExistsError for a file or another
    non-empty directory (never ours to delete)."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).exists():
        raise FileExistsError(f"{target} is a non-empty directory without {marker}; refusing to replace it")
    return target


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """A temporary directory next to `target` to fill in the `with` block. When the block succeeds it
    becomes `target` (directories 0755, files 0644: mkdtemp's are private 0700/0600, a model directory is
    an ordinary, shareable one), replacing an existing `target` only then; when it fails it is removed
    and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_state(state: dict[str, Tensor], directory: Path, max_shard_bytes: int = 5 * 10**9) -> None:
    """`state` as model.safetensors in `directory`, or as shards with model.safetensors.index.json above
    `max_shard_bytes` (the HF layout, names from huggingface_hub's splitter)."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
    shards = split.filename_to_tensors.items()
    for filename, keys in tqdm(shards, desc="writing shards", disable=len(shards) < 3):
        save_file({k: state[k] for k in keys}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def save(model: Gemma, path: str | os.PathLike, dtype: torch.dtype | None = None,
         max_shard_bytes: int = 5 * 10**9, tokenizer: Tokenizer | None = None) -> Path:
    """Write config.json and model.safetensors (sharded with an index above `max_shard_bytes`) to the
    directory `path`, which transformers loads with `from_pretrained`. An existing checkpoint directory
    there is replaced, but only once the new one is complete.

    With a `tokenizer`, its files go in too (Tokenizer.save: tokenizer.model or tokenizer.json,
    tokenizer_config.json with the chat template of the model's generation, special_tokens_map.json,
    generation_config.json with the stop ids), so the directory loads into every gemmakit command and
    into transformers. The directory is 0755 and its files 0644, not mkdtemp's private 0700/0600.
    Raises FileExistsError when `path` is a file or a non-empty directory that is not a checkpoint.
    """
    target = check_replaceable(Path(path).expanduser(), CONFIG)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device (no weights to save); load or init_weights first")

    state = model.state_dict()
    # A quantized model (gemmakit.quant; a Q4_0/Q8_0 GGUF loads as one) would be written as integer
    # tensors under float names that neither transformers nor `load` reads: refuse before writing.
    if packed := next((k for k, v in state.items() if not v.is_floating_point()), None):
        raise ValueError(f"{model.config.name} has quantized weights ({packed}: {state[packed].dtype}); an HF "
                         "checkpoint holds float weights: save before quantizing, or load a Q4_0/Q8_0 GGUF "
                         "with float weights (hub.load(..., native=False))")
    state = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous() for k, v in state.items()}
    if model.config.vision is not None:  # Gemma3ForConditionalGeneration: Google's published key names
        state = {("language_model." + k if k.startswith("model.") else k): v for k, v in state.items()}
    hf = to_hf(model.config)
    hf["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_directory(target) as tmp:
        (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        write_state(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp, generation=model.config.generation)
    return target
