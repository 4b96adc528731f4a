"""Reward models: a Gemma backbone with a scalar head on the last token, trained on preference pairs.

`RewardModel` is Gemma plus `score`, a bias-free Linear(d_model, 1) applied to the final-normed hidden
state of each sequence's last token: the layout of transformers' `GemmaForSequenceClassification`,
`Gemma2ForSequenceClassification` and `Gemma3TextForSequenceClassification` with num_labels=1 (tensors
`model.*` and `score.weight`, no LM head), so a saved reward model loads in transformers and scores the
same (tested to 1e-5), and transformers' reward models load here. Sequences are left-padded here (the
last column is every sequence's last token); transformers takes the rightmost non-pad token instead,
which is the same token.

Training: the Bradley-Terry model of preferences, P(chosen > rejected) = sigmoid(r_chosen - r_rejected)
(Bradley & Terry, 1952; the reward models of InstructGPT and of the Gemma reports), fitted by minimizing
-log sigmoid(r_c - r_r) averaged over pairs. Data: JSONL lines with the prompt and the two replies, as
TRL writes preference data:
    {"prompt": "raw text", "chosen": "...", "rejected": "..."}                  raw text, concatenated
    {"messages": [...] or "prompt": [...], "chosen": "..." or [{"role": "assistant", ...}], "rejected": ...}
the second rendered with the model's chat template (the reply as the model's turn). `render` is the one
function that turns (prompt, reply) into ids: reward training, `reward score` and RL all use it, so a
reward model always sees text laid out as it was trained on. Pairs are split train/validation by a
hash of their prompt, so both replies of a prompt, and every pair sharing a prompt, land in one split.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.config import Config, to_hf
from gemmakit.engine import left_pad
from gemmakit.model import Gemma
from gemmakit.train.data import Batches, json_lines

# transformers' class for each generation (text models only: Gemma 3 4B+ with its vision tower would be
# Gemma3ForSequenceClassification, which gemmakit does not write).
ARCHITECTURES = {1: "GemmaForSequenceClassification", 2: "Gemma2ForSequenceClassification",
                 3: "Gemma3TextForSequenceClassification"}
SCORE = "score.weight"


class RewardModel(Gemma):
    """Gemma's body plus `score` [1, d_model]: one scalar per sequence, read at its last token."""

    def __init__(self, config: Config) -> None:
        if config.vision is not None:
            raise ValueError("reward models are text models: a Gemma 3 checkpoint with a vision tower cannot be one "
                             "(use its text-only sizes or strip the tower)")
        super().__init__(config)
        self.score = nn.Linear(config.d_model, 1, bias=False)

    def rewards(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """Scores [B] (fp32) of left-padded sequences tokens [B, T] (positions -1 on padding; see engine.left_pad)."""
        h = self.hidden(tokens, positions)[:, -1]
        return self.score(h)[:, 0].float()


def from_language_model(lm: Gemma) -> RewardModel:
    """A reward model on `lm`'s weights (shared, not copied) with a new score head. The head starts at
    zero, so every reply scores 0 at first (the Bradley-Terry loss starts at log 2, whatever the seed);
    the backbone's gradient flows once the head has moved (after one step)."""
    with torch.device("meta"):
        rm = RewardModel(lm.config)
    state = dict(lm.state_dict())
    state[SCORE] = torch.zeros(1, lm.config.d_model, dtype=lm.dtype, device=lm.model.embed_tokens.weight.device)
    rm.load_state_dict(state, strict=True, assign=True)
    return rm


@torch.no_grad()
def score(model: RewardModel, sequences: list[list[int]], batch_size: int = 16) -> Tensor:
    """Rewards [N] (fp32) of token sequences, batch_size at a time (each batch left-padded)."""
    was = model.training
    model.eval()
    device = model.model.embed_tokens.weight.device
    out = []
    for start in range(0, len(sequences), batch_size):
        tokens, positions = left_pad(sequences[start:start + batch_size], device)
        out.append(model.rewards(tokens, positions))
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


# -- the loss ----------------------------------------------------------------------------------------

def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean of -log sigmoid(chosen - rejected) over pairs (chosen, rejected: rewards [B]).

    Written as softplus(rejected - chosen), which is the same number without overflow for large margins.
    Its gradient w.r.t. chosen_i is -sigmoid(rejected_i - chosen_i) / B (and the opposite for rejected_i)."""
    d = rejected - chosen
    return F.softplus(d if d.dtype in (torch.float32, torch.float64) else d.float()).mean()


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Fraction of pairs ranked right (chosen > rejected); a tie counts one half (a coin flip)."""
    right = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return float(right.mean()) if len(right) else float("nan")


def pair_loss(model: RewardModel, batch: dict) -> Tensor:
    """The trainer's loss_fn: Bradley-Terry on a PairData batch (chosen rows, then rejected rows)."""
    r = model.rewards(batch["tokens"], batch["positions"])
    b = r.shape[0] // 2
    return bradley_terry_loss(r[:b], r[b:])


@torch.no_grad()
def evaluate_pairs(model: RewardModel, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16) -> dict:
    """{"pairs", "accuracy", "loss" (mean Bradley-Terry), "margin" (mean r_chosen - r_rejected)} on id pairs."""
    if not pairs:
        return {"pairs": 0, "accuracy": None, "loss": None, "margin": None}
    c = score(model, [p[0] for p in pairs], batch_size)
    r = score(model, [p[1] for p in pairs], batch_size)
    return {"pairs": len(pairs), "accuracy": pairwise_accuracy(c, r), "loss": float(bradley_terry_loss(c, r)),
            "margin": float((c - r).mean())}


# -- data --------------------------------------------------------------------------------------------

def _messages(record: dict) -> list | None:
    """The conversation a record's reply continues: "messages", or TRL's conversational "prompt" list."""
    if isinstance(record.get("messages"), list):
        return record["messages"]
    if isinstance(record.get("prompt"), list):
        return record["prompt"]
    return None


def render(tokenizer, generation: int, record: dict, reply: Any) -> list[int]:
    """Ids of `reply` following the record's prompt: raw text <bos> prompt + reply (plain text, no control
    tokens), or the conversation plus the reply as the model's turn, with the model's chat template.

    `reply` is a string, or for conversations a list of messages (TRL's conversational replies).
    Raises ValueError for a record with neither a string "prompt" nor a "messages" list, or a reply of
    the wrong kind."""
    from gemmakit.tokenizer import encode_chat

    messages = _messages(record)
    if messages is not None:
        if isinstance(reply, str):
            reply = [{"role": "assistant", "content": reply}]
        if not isinstance(reply, list):
            raise ValueError(f"a reply must be a string or a list of messages, not {type(reply).__name__}")
        return encode_chat(tokenizer, messages + reply, generation, add_generation_prompt=False)
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError('a record needs a "prompt" (a string, or a list of messages) or a "messages" list')
    if not isinstance(reply, str):
        raise ValueError(f"a reply to a text prompt must be a string, not {type(reply).__name__}")
    return tokenizer.encode(prompt + reply, add_bos=True, parse_special=False)


def prompt_key(record: dict) -> str:
    """What identifies a record's prompt (for the train/validation split): its JSON."""
    messages = _messages(record)
    return json.dumps(messages if messages is not None else record.get("prompt"), sort_keys=True, ensure_ascii=False)


def read_jsonl(paths: list[str | os.PathLike]) -> list[tuple[str, dict]]:
    """("file:line", object) for every non-blank line of the JSONL files; ValueError naming file:line for
    a line that is not a JSON object, FileNotFoundError for a missing file."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a JSONL file")
        if not path.is_file():
            raise FileNotFoundError(f"no such JSONL file: {path}")
        for where, record in json_lines(path):
            if isinstance(record, ValueError):
                raise ValueError(f"{where}: {record}")
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
            out.append((where, record))
    return out


def read_pairs(paths: list[str | os.PathLike], tokenizer, generation: int, max_len: int | None = None
               ) -> tuple[list[tuple[list[int], list[int], str]], int]:
    """([(chosen ids, rejected ids, prompt key)], dropped): every preference pair of the JSONL files,
    rendered with `render`. Pairs where either side is longer than `max_len` tokens are dropped (counted),
    never cut. ValueError names the file:line of a line without "chosen"/"rejected" or a prompt."""
    pairs, dropped = [], 0
    for where, record in read_jsonl(paths):
        missing = [k for k in ("chosen", "rejected") if k not in record]
        if missing:
            raise ValueError(f"{where}: a preference pair needs \"chosen\" and \"rejected\" "
                             f"(missing: {', '.join(missing)})")
        try:
            c = render(tokenizer, generation, record, record["chosen"])
            r = render(tokenizer, generation, record, record["rejected"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if max_len is not None and max(len(c), len(r)) > max_len:
            dropped += 1
            continue
        pairs.append((c, r, prompt_key(record)))
    if not pairs:
        raise ValueError(f"no preference pairs in {', '.join(map(str, paths))}" + (f" ({dropped} longer than "
                         f"--max-len {max_len} were dropped)" if dropped else ""))
    return pairs, dropped


def split_pairs(pairs: list[tuple[list[int], list[int], str]], val_fraction: float
                ) -> tuple[list[tuple[list[int], list[int]]], list[tuple[list[int], list[int]]]]:
    """(train, val) id pairs: a pair is held out when the hash of its prompt falls below val_fraction."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for c, r, key in pairs:
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        (val if h < val_fraction else train).append((c, r))
    return train, val


class PairData(Batches):
    """Preference pairs for the trainer: each batch is `batch_size` pairs as one left-padded batch of
    2 * batch_size sequences (tokens, positions: the chosen replies, then the rejected ones, in the same
    order) plus `targets` [2B] (the trainer weighs micro-batches by their count of targets). Shuffled per
    epoch by `seed`, with the trainer's resumable position (Batches); under torchrun each `rank` of
    `world` takes its slice of every global batch of batch_size * world pairs."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        if not pairs:
            raise ValueError("no preference pairs to train on")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        self.pairs = pairs
        self.n_windows, self.batch_size, self.shuffle, self.seed = len(pairs), batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self._start()

    def windows(self, idx) -> dict[str, Tensor]:
        seqs = [self.pairs[i][0] for i in idx] + [self.pairs[i][1] for i in idx]
        tokens, positions = left_pad(seqs)
        return {"tokens": tokens, "positions": positions, "targets": torch.zeros(len(seqs), dtype=torch.long)}


# -- checkpoints -------------------------------------------------------------------------------------

def is_reward_model(path: str | os.PathLike) -> bool:
    """Does the HF directory hold a sequence-classification model (config.json "architectures")?"""
    from gemmakit.weights import CONFIG

    try:
        hf = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def save_reward_model(model: RewardModel, path: str | os.PathLike, tokenizer=None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write `model` as transformers' Gemma*ForSequenceClassification (num_labels=1) HF directory:
    config.json (the model's config with that architecture and one label), model.safetensors
    (`model.*`, `score.weight`), and the tokenizer's files if given. Built in a temporary directory
    and renamed into place (see weights.save); FileExistsError for a path that is not a checkpoint."""
    from gemmakit.weights import CONFIG, atomic_directory, check_replaceable, write_state

    target = check_replaceable(Path(path).expanduser(), CONFIG)
    state = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    hf = to_hf(model.config)
    hf.update(architectures=[ARCHITECTURES[model.config.generation]], id2label={"0": "LABEL_0"},
              label2id={"LABEL_0": 0}, dtype=str(state[SCORE].dtype).removeprefix("torch."))
    with atomic_directory(target) as tmp:
        (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        write_state(state, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp, generation=model.config.generation)
    return target


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> RewardModel:
    """A reward model from an HF directory (gemmakit's or transformers' Gemma*ForSequenceClassification
    with num_labels=1), strictly: every tensor present, nothing extra. ValueError names a directory
    that holds a language model (no score head) or a classifier with more than one label."""
    from gemmakit import weights

    p = weights.resolve(path)
    config = weights.load_config(p).replace(name=str(path))
    state = weights.load_state_dict(p)
    head = state.get(SCORE)
    if head is None:
        raise ValueError(f"{path} has no {SCORE}: it is a language model, not a reward model; start a reward model "
                         f"from it with `gemmakit reward train --model {path}`")
    if head.ndim != 2 or head.shape[0] != 1:
        raise ValueError(f"{path}: {SCORE} has shape {list(head.shape)}; a reward model has one label "
                         f"(num_labels=1, [1, {config.d_model}])")
    with torch.device("meta"):
        model = RewardModel(config)
    state = weights.sanitize(state, config)
    weights.check_state_dict(model, state)
    for key in state:
        state[key] = state[key].to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_for_training(spec: str | None, dtype: torch.dtype = torch.float32):
    """(reward model, tokenizer) to train: a reward model directory is continued; any language model
    gemmakit loads (GGUF, HF directory, hub id, `default`) gets a new score head (from_language_model)."""
    from gemmakit import hub
    from gemmakit.tokenizer import Tokenizer

    if spec is not None and Path(spec).expanduser().is_dir() and is_reward_model(Path(spec).expanduser()):
        path = Path(spec).expanduser()
        return load_reward_model(path, dtype), Tokenizer.from_dir(path)
    lm, tok = hub.load(spec, dtype=dtype)
    return from_language_model(lm), tok


def load_scorer(spec: str, dtype: torch.dtype = torch.float32):
    """(reward model, tokenizer) of a saved reward model directory (for scoring)."""
    from gemmakit.tokenizer import Tokenizer

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no such reward model directory: {path}")
    return load_reward_model(path, dtype), Tokenizer.from_dir(path)
