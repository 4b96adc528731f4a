"""Training checkpoints without pickle (gemmakit.train.checkpoint): only safetensors and JSON in
OUT/checkpoint/, a resume with every unpickler in the process disabled, pickles (an old checkpoint.pt, a
pickled file in the directory) refused by name, a truncated shard named, a crash between the two renames
of a save leaving the previous checkpoint, and RNG states that survive JSON."""

import json
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch

from gemmakit import cli
from gemmakit.config import get_config
from gemmakit.model import build
from gemmakit.train import checkpoint as C
from gemmakit.train import data as D
from gemmakit.train import trainer as T

CFG = get_config("gemma3-270m").replace(name="tiny", vocab_size=300, d_model=32, n_layers=2, n_heads=2,
                                        n_kv_heads=1, head_dim=16, intermediate_size=64, sliding_window=8,
                                        layer_types=("local", "global"))


def encode(text):
    return [b + 3 for b in text.encode()]


@pytest.fixture
def data_dir(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox {i * 7}"}) + "\n" for i in range(40)))
    D.prepare([src], encode, tmp_path / "data", CFG.vocab_size, val_fraction=0.0)
    return tmp_path / "data"


def model(seed=0):
    torch.manual_seed(seed)
    m = build(CFG, "cpu")
    m.init_weights()
    return m


def tcfg(**kw):
    return T.TrainConfig(**{**dict(steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup=1, ckpt_every=2, chunk=7), **kw})


def run(data_dir, out, **kw):
    return T.train(model(kw.pop("seed", 0)), D.PackedData(data_dir, "train", 16, 2, seed=1), tcfg(), out, **kw)


def stop_at(n):
    """A cross-entropy loss that sends this process SIGINT during its n-th call (the step finishes, a
    checkpoint is written, train returns)."""
    ce, calls = T.ce_loss(7), {"n": 0}

    def f(m, batch):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return ce(m, batch)
    return f


def losses(res):
    return [r["loss"] for r in res["log"]]


@pytest.fixture
def stopped(data_dir, tmp_path):
    """(reference losses of the uninterrupted run, a run directory stopped after step 2)."""
    ref = run(data_dir, tmp_path / "ref")
    first = run(data_dir, tmp_path / "run", loss_fn=stop_at(2))
    assert first["interrupted"] == "SIGINT" and first["step"] == 2
    return losses(ref), tmp_path / "run", losses(first)


def test_checkpoint_is_safetensors_and_json_only(stopped):
    _, out, _ = stopped
    state = C.read(out)
    names = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert names == ["rank-00000.json", "shard-00000.safetensors", "state.json"]
    assert state["step"] == 2 and state["world_size"] == 1 and state["data"] == {"epoch": 0, "pos": 4}
    assert state["train_config"]["steps"] == 4 and state["config"]["d_model"] == CFG.d_model
    assert set(json.loads((out / "checkpoint" / "rank-00000.json").read_text())["rng"]) >= {"torch", "numpy", "python"}
    assert not any(p.name.startswith("checkpoint.") for p in out.iterdir())  # no .tmp / .old left behind


def test_resume_with_every_unpickler_disabled(stopped, data_dir, monkeypatch):
    ref, out, first = stopped

    class NoUnpickler(pickle.Unpickler):
        def load(self):
            raise AssertionError("a pickle was loaded")

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    second = run(data_dir, out, seed=9, resume=True)  # another init: everything comes from the checkpoint
    assert first + losses(second) == ref


def test_crash_between_the_renames_keeps_the_previous_checkpoint(stopped, data_dir, monkeypatch):
    ref, out, first = stopped
    real = os.rename

    def crash(src, dst):
        if str(src).endswith("checkpoint.tmp"):  # checkpoint -> checkpoint.old is done, the new one not in place
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        run(data_dir, out, resume=True)
    monkeypatch.setattr(os, "rename", real)
    assert not (out / "checkpoint").exists() and C.find(out) == out / "checkpoint.old"
    assert C.read(out)["step"] == 2  # the previous checkpoint, intact
    second = run(data_dir, out, resume=True)
    assert first + losses(second) == ref
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def cli_resume(data_dir, out, capsys):
    """`gemmakit train --resume` on a run directory: (exit status, stderr)."""
    capsys.readouterr()
    student = data_dir.parent / "student.json"  # the tiny CFG (the checks fail before it is built)
    student.write_text(json.dumps({"base": "gemma3-270m", "vocab_size": 300, "d_model": 32, "n_layers": 2,
                                   "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "intermediate_size": 64}))
    code = cli.main(["train", "--data", str(data_dir), "--out", str(out), "--model", str(student), "--resume",
                     "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--lr", "3e-3", "--warmup", "1",
                     "--ckpt-every", "2", "--chunk", "7"])
    return code, capsys.readouterr().err


def test_old_pickled_checkpoint_pt_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    torch.save({"step": 3}, out / "checkpoint.pt")  # what gemmakit wrote before: a pickle
    with pytest.raises(ValueError, match=r"checkpoint.pt: a pickled checkpoint of an earlier gemmakit, which is not "
                                         r"loaded"):
        run(data_dir, out, resume=True)
    code, err = cli_resume(data_dir, out, capsys)
    assert code == 1 and err.count("\n") == 1 and f"{out / 'checkpoint.pt'}: a pickled checkpoint" in err
    with pytest.raises(FileExistsError, match=r"already holds a training run \(checkpoint.pt\)"):
        run(data_dir, out)
    assert run(data_dir, out, overwrite=True)["step"] == 4 and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("name, content", [
    (".metadata", pickle.dumps({"planner": "DCP's default metadata"})),
    ("extra.pt", b"anything"),
    ("notes", pickle.dumps([1, 2, 3])),
])
def test_a_pickled_file_in_the_checkpoint_is_refused(stopped, data_dir, capsys, name, content):
    _, out, _ = stopped
    (out / "checkpoint" / name).write_bytes(content)
    bad = out / "checkpoint" / name
    with pytest.raises(ValueError, match="a pickle file in a checkpoint directory"):
        run(data_dir, out, resume=True)
    code, err = cli_resume(data_dir, out, capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"gemmakit: error: {bad}: a pickle file in a checkpoint directory; gemmakit does not load")


def test_truncated_shard_names_the_file(stopped, data_dir, capsys):
    _, out, _ = stopped
    shard = next((out / "checkpoint").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard}: truncated or damaged shard"):
        run(data_dir, out, resume=True)
    code, err = cli_resume(data_dir, out, capsys)
    assert code == 1 and err.count("\n") == 1 and str(shard) in err
    # a shard of the recorded size whose header promises more than the file holds
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    state["files"][shard.name] = shard.stat().st_size
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"{shard}: truncated shard"):
        C.read(out)


def test_damaged_state_json_names_the_file(stopped):
    _, out, _ = stopped
    (out / "checkpoint" / "state.json").write_text('{"step": 2, "optim')
    with pytest.raises(ValueError, match=f"{out / 'checkpoint' / 'state.json'}: not readable JSON"):
        C.read(out)


def test_rng_states_survive_json():
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    torch.rand(3), np.random.normal(), random.gauss(0, 1)  # a cached Gaussian in numpy's and Python's state
    saved = json.loads(json.dumps(C.rng_state()))
    expect = torch.rand(4), np.random.normal(size=3), random.gauss(0, 1), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    C.set_rng_state(saved)
    got = torch.rand(4), np.random.normal(size=3), random.gauss(0, 1), random.random()
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2:] == got[2:]


def test_resume_on_another_number_of_ranks_keeps_the_global_batch():
    import dataclasses

    saved = {**dataclasses.asdict(tcfg()), "world_size": 2}  # 2 ranks x batch 2: 4 sequences per step
    assert T.check_resume(saved, {}, tcfg(batch_size=4), {}, world=1) == ["batch_size 2 -> 4"]
    assert T.check_resume(saved, {}, tcfg(grad_accum=2), {}, world=1) == ["grad_accum 1 -> 2"]
    with pytest.raises(ValueError, match=r"ranks 2 -> 1 \(the global batch, batch_size x grad_accum x ranks, would "
                                         r"change from 4 to 2 sequences: set --batch-size or --grad-accum to keep it 4"):
        T.check_resume(saved, {}, tcfg(), {}, world=1)
    with pytest.raises(ValueError, match=r"batch_size 2 -> 4 \(the global batch, .* from 4 to 8 sequences\)"):
        T.check_resume(saved, {}, tcfg(batch_size=4), {}, world=2)
