"""Distillation objectives for the trainer, and student configs.

- `online_full_loss(teacher)`: Gemma 2 full-distribution distillation, the teacher run on every batch.
- `cached_sampled_loss(cache)`: Gemma 3 sampled-logit distillation from a teacher cache (no teacher
  in memory).
- `online_sampled_loss(teacher, k)`: the same objective with the sample drawn on the fly.
- `online_jsd_loss(teacher, beta)`: GKD's generalized JSD (forward KL, reverse KL or between), for SFT.
Students: a preset name, or a JSON/TOML file `{"base": "<preset>", <Config field>: value, ...}`.

Vocabularies: the student's ids must be teacher ids with the same pieces. Gemma 3 4B/12B/27B have
262,208 embedding rows and 1B/270M 262,144 (the same tokenizer; the extra rows are the image soft
token and padding), so a student may have FEWER rows than its teacher: the teacher's distribution is
then taken over the student's ids and renormalized (softmax of the teacher's logits truncated to the
student's vocabulary), in every objective.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch

from gemmakit.config import CONFIGS, GLOBAL, Config, get_config, layer_pattern
from gemmakit.train.losses import IGNORE, distill_full, distill_jsd, distill_sampled, sample_teacher
from gemmakit.train.teacher_cache import TeacherCache
from gemmakit.train.trainer import LossFn


def student_config(spec: str) -> Config:
    """A preset name, or a .json/.toml file naming a `base` preset plus field overrides.

    If `n_layers` changes and `layer_types` is not given, the base's local/global pattern is repeated
    (every 6th layer global for Gemma 3, every 2nd for Gemma 2, all global for Gemma 1).
    """
    if spec in CONFIGS:
        return get_config(spec)
    path = Path(spec)
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"unknown student {spec!r}: give a preset ({', '.join(CONFIGS)}) or a .json/.toml file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such student config file")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot parse ({e})") from None
    if "base" not in raw:
        raise ValueError(f"{path}: needs a 'base' preset name to override")
    base = get_config(raw.pop("base"))
    fields = set(Config.__dataclass_fields__)
    if unknown := set(raw) - fields:
        raise ValueError(f"{path}: unknown config fields {sorted(unknown)}")
    if "layer_types" in raw:
        raw["layer_types"] = tuple(raw["layer_types"])
    elif "n_layers" in raw:
        if GLOBAL not in base.layer_types or all(t == GLOBAL for t in base.layer_types):
            raw["layer_types"] = (GLOBAL,) * raw["n_layers"]
        else:
            raw["layer_types"] = layer_pattern(raw["n_layers"], base.layer_types.index(GLOBAL) + 1)
    raw.setdefault("name", path.stem)
    return base.replace(**raw)


def check_vocab(student: Config | int, teacher_vocab: int, what: str = "teacher") -> None:
    """The student's vocabulary (rows, or a Config) must be a prefix of the teacher's: no larger.
    Whether the shared ids are the same pieces is `check_pieces`'s job (it needs the tokenizers)."""
    rows = student.vocab_size if isinstance(student, Config) else student
    if rows > teacher_vocab:
        raise ValueError(f"student vocabulary ({rows}) is larger than the {what} vocabulary ({teacher_vocab}): "
                         f"the student's ids must be {what} ids (a shared tokenizer)")


def check_pieces(a, b, a_name: str, b_name: str) -> None:
    """Two tokenizers (gemmakit.tokenizer.Tokenizer, or None: unknown, nothing to check) must give the
    ids they share the same pieces; raises ValueError naming the first id that differs."""
    if a is None or b is None:
        return
    for i, (x, y) in enumerate(zip(a.pieces, b.pieces)):
        if x != y:
            raise ValueError(f"the {a_name} and {b_name} tokenizers differ at id {i} ({x!r} vs {y!r}): "
                             f"they are not the same vocabulary")


def _teacher_hidden(teacher: torch.nn.Module, batch: dict) -> torch.Tensor:
    # Inference mode: no autograd bookkeeping at all for the frozen teacher (its output is only read).
    with torch.inference_mode():
        return teacher.hidden(batch["tokens"], batch.get("positions"), segment_ids=batch.get("segment_ids"))


def _student_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model.hidden(batch["tokens"], batch.get("positions"), segment_ids=batch.get("segment_ids"))


def online_full_loss(teacher: torch.nn.Module, temperature: float = 1.0, alpha: float = 0.0,
                     chunk: int = 1024) -> LossFn:
    teacher.eval().requires_grad_(False)

    def f(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        th = _teacher_hidden(teacher, batch)
        return distill_full(model, _student_hidden(model, batch), teacher, th, batch["targets"],
                            temperature, alpha, chunk)
    return f


def online_jsd_loss(teacher: torch.nn.Module, beta: float = 0.0, temperature: float = 1.0, alpha: float = 0.0,
                    chunk: int = 1024) -> LossFn:
    """GKD's generalized JSD to the teacher run on every batch (losses.distill_jsd; beta 0: forward KL)."""
    teacher.eval().requires_grad_(False)

    def f(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        th = _teacher_hidden(teacher, batch)
        return distill_jsd(model, _student_hidden(model, batch), teacher, th, batch["targets"], beta, temperature,
                           alpha, chunk)
    return f


def online_sampled_loss(teacher: torch.nn.Module, k: int = 256, alpha: float = 0.0, chunk: int = 1024,
                        seed: int = 0, kl: bool = False) -> LossFn:
    """Sampled-logit distillation with the sample drawn now (same estimator as the cache); `kl`: report
    the KL form (see losses.distill_sampled)."""
    teacher.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    if not 0 < k <= teacher.config.vocab_size:
        raise ValueError(f"k = {k} must be in [1, {teacher.config.vocab_size}]")

    def f(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        th = _teacher_hidden(teacher, batch)
        targets = batch["targets"].reshape(-1)
        ids = torch.zeros(targets.shape[0], k, dtype=torch.long, device=th.device)
        probs = torch.zeros(targets.shape[0], k, device=th.device)
        with torch.no_grad():
            # Sampled only where a target is counted (distill_sampled drops the other rows).
            keep = (targets != IGNORE).nonzero()[:, 0]
            flat = th.reshape(-1, th.shape[-1])[keep].float()
            for s in range(0, flat.shape[0], chunk):
                # Over the student's ids only: sampling and renormalizing the truncated logits.
                i, p = sample_teacher(teacher.logits(flat[s:s + chunk])[:, :model.config.vocab_size], k, gen)
                ids[keep[s:s + chunk]], probs[keep[s:s + chunk]] = i, p
        return distill_sampled(model, _student_hidden(model, batch), ids, probs, targets, alpha, chunk, kl=kl)
    return f


def cached_sampled_loss(cache: TeacherCache, alpha: float = 0.0, chunk: int = 1024) -> LossFn:
    def f(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        ids, probs = cache.lookup(batch["windows"])
        return distill_sampled(model, _student_hidden(model, batch), ids, probs, batch["targets"], alpha, chunk)
    return f
