"""The compiled decode step, built once per machine and kept in gemmakit's cache (AOTInductor packages).

`engine.generate(compile=True)` and the scheduler (gemmakit.serve) run their decode steps through
`compiled_step`. torch.compile would re-trace the model with Dynamo in every new process (for the
18-layer Gemma 3 270M, 8-15 s per process even with inductor's on-disk caches warm, measured on the
2-core test machine), so the step is instead exported once (torch.export) and compiled ahead of time
by AOTInductor into a package: a shared library that a later process loads in a fraction of a second,
with no tracing at all.

A package is a directory `<cache>/compile/<key>/` holding `step.pt2` and `meta.json` (the package's
sha256, how long the build took, which model it is for); `<cache>` is gemmakit's cache (hub.home(),
$GEMMAKIT_HOME or ~/.cache/gemmakit). The key digests everything the compiled code specializes on:
the model's config, module tree and every weight's name, dtype, shape and stride; the KV caches'
shapes and dtype (so the batch and the cache bucket); torch's version, the CPU (its model name and
flags: inductor compiles with -march=native), torch's thread count (compiled into the kernels) and the
source of the gemmakit modules the step runs. The package holds no weights: the model's parameters and
buffers are inputs of every step (no copy), so one package serves any model of the same layout.

Building prints one line on stderr with an estimate of its duration (the last build of the same
model on this machine, else one scaled from another model's by layer count, else a guess from the
layer count). A package whose checksum does not match, or that torch cannot load, is deleted and
rebuilt after a one-line notice; a build that fails (no C++ compiler, an unsupported model) gives a
one-line notice and the step runs eagerly. Inductor's own caches go to `<cache>/compile/inductor`
unless TORCHINDUCTOR_CACHE_DIR is set, so that a rebuild reuses the kernels already compiled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from gemmakit.cache import KVCache
from gemmakit.model import Gemma

# The modules whose code runs inside the decode step: a change to any of them is a different program.
_SOURCES = ("cache.py", "config.py", "model.py", "quant.py", "compiled.py", "kernels/__init__.py",
            "kernels/q4_0.cpp", "kernels/bf16.cpp", "kernels/int8.cpp")
_PACKAGE, _META = "step.pt2", "meta.json"

# Packages loaded in this process, by key.
_runners: dict[str, object] = {}


def decode_step(model: Gemma, token: Tensor, pos: Tensor, cache: list[KVCache]) -> Tensor:
    """Logits [B, V] in fp32 of one new token per sequence (token, pos: [B, 1]); advances `cache`.

    fp32 because the compiled step converts for free, whereas an eager argmax over 262,144 bf16
    logits took 1 ms per token, 4% of a bf16 decode step.
    """
    return model(token, pos, cache)[:, -1].float()


class _Step(nn.Module):
    """decode_step with everything as flat tensor inputs, for torch.export: the caches (k, v, pos, step
    per layer), then the model's parameters and buffers (`names`). Weights as inputs, not constants,
    keep them out of the package (no second copy on disk) and let one package serve every model of
    the same layout, whatever its weights' values."""

    def __init__(self, model: Gemma, rings: list[bool], names: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: export would lift its weights as constants
        self.rings, self.names = rings, names

    def forward(self, token: Tensor, pos: Tensor, *flat: Tensor) -> Tensor:
        n = 4 * len(self.rings)
        caches = []
        for i, ring in enumerate(self.rings):
            c = KVCache.__new__(KVCache)  # the same object the engine uses, around the given tensors
            c.k, c.v, c.pos, c.step = flat[4 * i:4 * i + 4]
            c.size, c.ring = c.k.shape[2], ring
            caches.append(c)
        tensors = dict(zip(self.names, flat[n:]))
        return torch.func.functional_call(self._model, tensors, (token, pos, caches))[:, -1].float()


def _weights(model: Gemma) -> tuple[list[str], list[Tensor]]:
    """The model's parameters and buffers (each tensor once), in the order the package takes them."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, _ in named], [t.detach() for _, t in named]


def _flat(cache: list[KVCache]) -> list[Tensor]:
    return [t for c in cache for t in (c.k, c.v, c.pos, c.step)]


def root() -> Path:
    """Where packages are kept: `compile` in gemmakit's cache."""
    from gemmakit.hub import home

    return home() / "compile"


@functools.cache
def _cpu() -> str:
    """The CPU's model name and feature flags (Linux), else what platform knows (read once per process)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def _source_digest() -> str:
    """Of the sources as imported (read once: the code that runs is the code loaded)."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES)).hexdigest()


def package_key(model: Gemma, cache: list[KVCache]) -> str:
    """Hex digest naming the package for `model` decoding into `cache` (see the module docstring)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    facts = (torch.__version__, platform.machine(), _cpu(), torch.backends.cpu.get_cpu_capability(),
             torch.get_num_threads(), _source_digest(), repr(model.config),
             [(name, type(m).__qualname__) for name, m in model.named_modules()],
             [(name, str(t.dtype), tuple(t.shape), t.stride(), str(t.device)) for name, t in tensors],
             [(c.ring, tuple(c.k.shape), str(c.k.dtype), str(c.k.device)) for c in cache])
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    from gemmakit.hub import sha256_file

    return sha256_file(path)


def _estimate(model: Gemma) -> int:
    """Seconds a build of `model` will take here, from earlier builds' meta.json (see the module docstring)."""
    name, layers = repr(model.config), model.config.n_layers
    same = other = None
    for meta_path in root().glob(f"*/{_META}"):
        try:
            meta = json.loads(meta_path.read_text())
            when, seconds = meta_path.stat().st_mtime, float(meta["seconds"]) * layers / int(meta["layers"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
        if meta.get("config") == name:
            same = max(same or (when, seconds), (when, float(meta["seconds"])))
        else:
            other = max(other or (when, seconds), (when, seconds))
    if same or other:
        return max(1, round((same or other)[1]))
    return 20 + 4 * layers  # no build seen here yet: a guess of the right order for a 2-core CPU


@contextlib.contextmanager
def _inductor_cache():
    """Inductor's caches in gemmakit's (unless TORCHINDUCTOR_CACHE_DIR is set) while building; the
    environment as it was afterwards (inductor reads the variable whenever it needs the folder)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root() / "inductor")
    try:
        yield
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def _build(model: Gemma, cache: list[KVCache], token: Tensor, pos: Tensor, target: Path) -> None:
    """Export and compile the step into `target` (a new directory, renamed into place when complete)."""
    print(f"gemmakit: compiling the decode step for this model, once: ~{_estimate(model)} s",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # Outside inference mode (generate runs in it): export needs ordinary tensors, and copies, since
        # the engine's caches are inference tensors.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _inductor_cache():
            warnings.simplefilter("ignore")  # torch's notes to its own developers, nothing a user can act on
            names, tensors = _weights(model)
            args = [t.clone() for t in (token, pos, *_flat(cache))] + tensors
            exported = torch.export.export(_Step(model, [c.ring for c in cache], names), tuple(args), strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp / _PACKAGE))
        meta = dict(sha256=_sha256(tmp / _PACKAGE), seconds=round(time.perf_counter() - start, 1),
                    config=repr(model.config), layers=model.config.n_layers, torch=torch.__version__)
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same package first: keep theirs
            if not (target / _META).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(target: Path) -> torch._C._aoti.AOTIModelPackageLoader:
    """The package in `target`, checked against its meta.json's sha256; raises if unreadable."""
    meta = json.loads((target / _META).read_text())
    if _sha256(target / _PACKAGE) != meta["sha256"]:
        raise ValueError("its checksum does not match")
    # torch's C++ loader itself: torch._inductor.aoti_load_package would first import inductor (2 s).
    return torch._C._aoti.AOTIModelPackageLoader(str(target / _PACKAGE), "model", False, 1, -1)


def _discard(path: Path) -> None:
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)  # first, so that no other process reads a half-deleted package
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def compiled_step(model: Gemma, cache: list[KVCache], token: Tensor, pos: Tensor
                  ) -> Callable[[Tensor, Tensor, list[KVCache]], Tensor] | None:
    """The compiled decode step for `model` and caches shaped like `cache`: loaded from gemmakit's cache,
    or built there first (tens of seconds to minutes, once per machine). `token`, `pos` [B, 1] are an
    example step's inputs (not run). The returned step(token, pos, cache) advances `cache` in place like
    decode_step; it reads the model's tensors as they are at this call (call again after swapping any).
    None if the step cannot be compiled here (a one-line notice on stderr says why).
    """
    key = package_key(model, cache)
    target = root() / key
    runner = _runners.get(key)
    for attempt in range(2):
        if runner is not None:
            break
        if not (target / _META).is_file():
            if target.exists():  # not a package of ours (a build renames whole directories into place)
                _discard(target)
            try:
                _build(model, cache, token, pos, target)
            except Exception as e:  # the step still runs, eagerly: compiling is an optimization
                print(f"gemmakit: warning: cannot compile the decode step ({_first_line(e)}); decoding eagerly",
                      file=sys.stderr, flush=True)
                return None
        try:
            runner = _load(target)
        except Exception as e:  # corrupt, truncated or stale: rebuilt once
            if attempt:
                print(f"gemmakit: warning: the rebuilt decode step cannot be loaded ({_first_line(e)}); "
                      "decoding eagerly", file=sys.stderr, flush=True)
                return None
            print(f"gemmakit: the compiled decode step in {target} cannot be used ({_first_line(e)}); rebuilding it",
                  file=sys.stderr, flush=True)
            _discard(target)
    _runners[key] = runner
    weights = _weights(model)[1]

    def step(token: Tensor, pos: Tensor, cache: list[KVCache]) -> Tensor:
        # A flat list straight to the loader (AOTICompiledModel.__call__ would pytree-flatten ~300 inputs
        # on every token). The package reads its inputs with the example's contiguous strides: a view
        # (a prompt's last column, say) is copied first.
        return runner.boxed_run([token.contiguous(), pos.contiguous(), *_flat(cache), *weights])[0]

    return step


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
