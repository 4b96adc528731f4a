"""Rewards for RL: checks of a reply (an exact answer, a command's verdict, any Python callable) and
reward models, combined by weights.

A reward scores a batch: `fn(records, replies) -> list of floats`, where each record is the prompt's
JSONL line (a dict: "prompt" or "messages", plus whatever the check needs, e.g. "answer") and each
reply is the generated text (without the stop token). `Rewards` adds up weighted rewards and keeps
each one's values, so a run logs its success rate next to the total it optimizes.

Kinds (`parse_spec`, the CLI's `--reward SPEC`):
  exact            1 if the reply's answer equals the record's "answer", else 0 (`exact_answer`)
  command:CMD      CMD run once per reply in a subprocess, no network, with a timeout (`CommandReward`)
  python:REF:FN    the function FN(record, reply) -> float of a module name or .py file REF
  model:DIR        a reward model's score of the rendered prompt + reply (`ModelReward`, reward.render)

Commands. CMD is split like a shell would split it (shlex; no shell runs it), and runs once per reply
in a new, empty temporary directory (removed afterwards) with the reply on stdin and the record as JSON
in the environment variable GEMMAKIT_RECORD. Its score is the last line of its stdout if that is a
number, else 1 for exit status 0 and 0 for anything else. A command that runs past `timeout` seconds is
killed with its whole process group and scores `fail` (0); so does one that cannot start. Without
network: each command runs under `unshare --net` (a new network namespace holding only a loopback
interface that is down: no route anywhere, the host's own 127.0.0.1 included). `unshare --net` needs
root or CAP_SYS_ADMIN; otherwise an unprivileged user namespace is tried (`unshare --user
--map-root-user --net`). If neither works here, CommandReward refuses to run (ValueError) rather than
run the command with network; `network=True` (`--reward-network`) runs it with the network, knowingly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

RewardFn = Callable[[list[dict], list[str]], list[float]]

# -- exact answers -----------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_of(reply: str) -> str:
    """The answer a reply gives: after a "####" marker if there is one (GSM8K's convention), the first
    number in the reply (commas dropped: "1,234" is 1234); the first line, stripped, if it has no number."""
    text = reply.split("####", 1)[1] if "####" in reply else reply
    m = _NUMBER.search(text)
    if m:
        return m.group().replace(",", "")
    return text.strip().split("\n", 1)[0].strip()


def _same(a: str, b: str) -> bool:
    """Equal as numbers (exactly, no float rounding: 42 == 42.0, 1,234 == 1234), else as strings."""
    try:
        return Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))
    except InvalidOperation:
        return a == b


def exact_answer(record: dict, reply: str) -> float:
    """1.0 if the reply's answer (`answer_of`) equals the record's "answer" (numbers compared as numbers,
    anything else as the exact string), else 0.0. ValueError if the record has no "answer"."""
    if "answer" not in record:
        raise ValueError(f"the exact reward needs an \"answer\" in every prompt record; this one has {sorted(record)}")
    return 1.0 if _same(answer_of(reply), str(record["answer"]).strip()) else 0.0


# -- commands ----------------------------------------------------------------------------------------

@functools.cache
def isolation_prefix() -> tuple[str, ...] | None:
    """The argv prefix that runs a command without network here (`unshare --net`, or in an unprivileged
    user namespace), found by trying each once; None if neither works on this machine."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ((unshare, "--net"), (unshare, "--user", "--map-root-user", "--net")):
        try:
            ok = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return None


def _score_of(returncode: int, stdout: bytes) -> float:
    lines = stdout.decode("utf-8", errors="replace").strip().splitlines()
    if lines:
        try:
            return float(lines[-1].strip())
        except ValueError:
            pass
    return 1.0 if returncode == 0 else 0.0


class CommandReward:
    """A reward computed by a command, once per reply (see the module docstring for the protocol).

    argv: the command (a list, or a string split with shlex); timeout: seconds before it is killed;
    network: allow network access (default False: run it in a network namespace of its own, or refuse);
    workers: replies scored at once (threads, each waiting on one process); fail: the score of a command
    that times out or cannot start. Raises ValueError for an empty command, a timeout <= 0, or when no
    network isolation is available and network is False.
    """

    def __init__(self, argv: list[str] | str, timeout: float = 10.0, network: bool = False, workers: int = 4,
                 fail: float = 0.0) -> None:
        self.argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if not self.argv:
            raise ValueError("the reward command is empty")
        if timeout <= 0:
            raise ValueError(f"the reward command's timeout must be > 0 seconds, got {timeout}")
        self.timeout, self.workers, self.fail = timeout, max(1, workers), fail
        self.prefix: tuple[str, ...] = ()
        if not network:
            prefix = isolation_prefix()
            if prefix is None:
                raise ValueError("cannot run reward commands without network here: `unshare --net` (root or "
                                 "CAP_SYS_ADMIN) and unprivileged user namespaces are both unavailable; allow the "
                                 "network knowingly with --reward-network (network=True)")
            self.prefix = prefix

    def run(self, record: dict, reply: str) -> float:
        """The score of one reply (see the class docstring)."""
        env = {**os.environ, "GEMMAKIT_RECORD": json.dumps(record, ensure_ascii=False)}
        with tempfile.TemporaryDirectory(prefix="gemmakit-reward-") as cwd:
            try:
                # A session of its own: on timeout the whole process group (the command's children too) is killed.
                p = subprocess.Popen([*self.prefix, *self.argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
            except OSError:
                return self.fail
            try:
                out, _ = p.communicate(reply.encode("utf-8"), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.communicate()
                return self.fail
            return _score_of(p.returncode, out)

    def __call__(self, records: list[dict], replies: list[str]) -> list[float]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, records, replies))


# -- Python callables and reward models -------------------------------------------------------------

def per_reply(fn: Callable[[dict, str], float]) -> RewardFn:
    """A batch reward from a function of one (record, reply)."""
    return lambda records, replies: [float(fn(r, y)) for r, y in zip(records, replies)]


def python_reward(ref: str, name: str) -> RewardFn:
    """The function `name(record, reply) -> float` of the module `ref` (an importable name, or a .py file)."""
    if ref.endswith(".py"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such Python file: {path}")
        spec = importlib.util.spec_from_file_location(f"gemmakit_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(ref)
        except ImportError as e:
            raise ValueError(f"cannot import the reward module {ref!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{ref} has no function {name!r}")
    return per_reply(fn)


class ModelReward:
    """A reward model's score of each (record, reply), rendered as in its training (reward.render)."""

    def __init__(self, model, tokenizer, batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(self, records: list[dict], replies: list[str]) -> list[float]:
        from gemmakit.train.reward import render, score

        seqs = [render(self.tokenizer, self.model.config.generation, r, y) for r, y in zip(records, replies)]
        return score(self.model, seqs, self.batch_size).tolist()


# -- combining ---------------------------------------------------------------------------------------

class Rewards:
    """sum_i weight_i * reward_i over named rewards; calling it gives (total [N], {name: values [N]})."""

    def __init__(self, parts: list[tuple[str, RewardFn, float]]) -> None:
        if not parts:
            raise ValueError("no reward given (e.g. --reward exact)")
        names = [n for n, _, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"two rewards have the same name: {names}")
        self.parts = parts

    def __call__(self, records: list[dict], replies: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        values = {}
        total = torch.zeros(len(replies), dtype=torch.float64)
        for name, fn, weight in self.parts:
            v = torch.tensor(fn(records, replies), dtype=torch.float64)
            if v.shape != total.shape:
                raise ValueError(f"reward {name} gave {v.numel()} scores for {len(replies)} replies")
            values[name] = v
            total += weight * v
        return total, values


def parse_spec(spec: str, timeout: float = 10.0, network: bool = False, workers: int = 4,
               dtype: torch.dtype = torch.float32) -> tuple[str, RewardFn]:
    """(name, reward) of one `--reward SPEC` (see the module docstring); ValueError for an unknown kind."""
    kind, _, arg = spec.partition(":")
    if kind == "exact" and not arg:
        return "exact", per_reply(exact_answer)
    if kind == "command" and arg:
        return "command", CommandReward(arg, timeout, network, workers)
    if kind == "python" and arg:
        ref, _, name = arg.rpartition(":")
        if not ref or not name:
            raise ValueError(f"--reward {spec}: write python:MODULE:FUNCTION or python:FILE.py:FUNCTION")
        return f"python:{name}", python_reward(ref, name)
    if kind == "model" and arg:
        from gemmakit.train.reward import load_scorer

        model, tok = load_scorer(arg, dtype)
        return f"model:{Path(arg).name or arg}", ModelReward(model, tok)
    raise ValueError(f"unknown --reward {spec!r}: use exact, command:CMD, python:MODULE:FUNCTION or model:DIR")


def check_spec(spec: str) -> None:
    """Refuse a malformed `--reward SPEC` before any model loads (nothing is run or imported)."""
    kind, _, arg = spec.partition(":")
    if (kind == "exact" and not arg) or (kind in ("command", "model") and arg):
        if kind == "model" and not Path(arg).expanduser().is_dir():
            raise FileNotFoundError(f"--reward {spec}: no such reward model directory: {arg}")
        return
    if kind == "python" and arg.count(":") >= 1 and all(arg.rpartition(":")[::2]):
        return
    raise ValueError(f"unknown --reward {spec!r}: use exact, command:CMD, python:MODULE:FUNCTION or model:DIR")


def build(specs: list[str], weights: list[float] | None = None, **kw: Any) -> Rewards:
    """Rewards from `--reward SPEC ...` and `--reward-weights W ...` (default: 1 each)."""
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"--reward-weights has {len(weights)} values for {len(specs)} rewards")
    for spec in specs:
        check_spec(spec)
    parts = [(*parse_spec(s, **kw), w) for s, w in zip(specs, weights or [1.0] * len(specs))]
    return Rewards(parts)
