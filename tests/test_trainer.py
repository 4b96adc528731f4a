"""Trainer: schedule, exact resume after SIGINT, checkpoints that survive a kill mid-write, gradient
accumulation, activation checkpointing, bf16, and FSDP2 on 2 gloo processes against one process."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from gemmakit.config import get_config
from gemmakit.model import build
from gemmakit.train import checkpoint as C
from gemmakit.train import data as D
from gemmakit.train import trainer as T
from gemmakit.train.parallel import apply_activation_checkpointing

CFG = get_config("gemma3-270m").replace(name="tiny", vocab_size=300, d_model=32, n_layers=2, n_heads=2,
                                        n_kv_heads=1, head_dim=16, intermediate_size=64, sliding_window=8,
                                        layer_types=("local", "global"))


def encode(text):
    return [b + 3 for b in text.encode()]


@pytest.fixture
def data_dir(tmp_path):
    src = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}"}) for i in range(60)]
    src.write_text("\n".join(lines) + "\n")
    D.prepare([src], encode, tmp_path / "data", CFG.vocab_size, val_fraction=0.1)
    return tmp_path / "data"


def model(seed=0):
    torch.manual_seed(seed)
    m = build(CFG, "cpu")
    m.init_weights()
    return m


def tcfg(**kw):
    base = dict(steps=6, batch_size=2, seq_len=16, lr=3e-3, warmup=2, ckpt_every=2, seed=0, chunk=7)
    return T.TrainConfig(**{**base, **kw})


def test_lr_schedule():
    f = T.lr_lambda(T.TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_resume_after_sigint_gives_identical_losses(data_dir, tmp_path):
    cfg = tcfg(mask_documents=True)
    ref = T.train(model(), D.PackedData(data_dir, "train", 16, 2, True, seed=3), cfg, tmp_path / "a")
    assert ref["interrupted"] is None and ref["step"] == 6

    ce = T.ce_loss(cfg.chunk)
    calls = {"n": 0}

    def interrupting(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3: the step finishes, a checkpoint is written, train returns
            os.kill(os.getpid(), signal.SIGINT)
        return ce(m, batch)

    first = T.train(model(), D.PackedData(data_dir, "train", 16, 2, True, seed=3), cfg, tmp_path / "b",
                    loss_fn=interrupting)
    assert first["interrupted"] == "SIGINT" and first["step"] == 3
    assert C.read(tmp_path / "b")["step"] == 3
    # a different initial model and a fresh loader: everything must come from the checkpoint
    second = T.train(model(seed=9), D.PackedData(data_dir, "train", 16, 2, True, seed=3), cfg, tmp_path / "b",
                     resume=True)
    losses = [r["loss"] for r in first["log"] + second["log"]]
    assert losses == [r["loss"] for r in ref["log"]]
    log = [json.loads(x) for x in (tmp_path / "b" / T.LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in log)


def files(directory):
    """{name: bytes} of a directory's files (a checkpoint, to see that it was left alone)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_fresh_run_refuses_an_earlier_run_unless_overwrite(data_dir, tmp_path):
    out = tmp_path / "r"
    T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=2), out)
    ck, log = files(out / T.CHECKPOINT), (out / T.LOG).read_text()
    with pytest.raises(FileExistsError, match=r"already holds a training run \(checkpoint, log.jsonl\)"):
        T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=3), out)
    assert files(out / T.CHECKPOINT) == ck and (out / T.LOG).read_text() == log
    res = T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=3, ckpt_every=100), out,
                  overwrite=True)
    assert res["step"] == 3 and C.read(out)["step"] == 3
    assert [json.loads(x)["step"] for x in (out / T.LOG).read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(ValueError, match="give one"):
        T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(), out, resume=True, overwrite=True)


@pytest.mark.parametrize("change, message", [
    (dict(steps=8), r"steps 4 -> 8 \(the cosine schedule is laid out over the run's length\)"),
    (dict(lr=1e-3), r"lr 0.003 -> 0.001"), (dict(seq_len=8), r"seq_len 16 -> 8"),
    (dict(seed=1), r"seed 0 -> 1 \(the data order would change\)"), (dict(batch_size=4), "batch_size 2 -> 4"),
])
def test_resume_refuses_settings_that_change_the_run(data_dir, tmp_path, change, message):
    out = tmp_path / "r"
    T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=4), out, extra_state={"objective": "ce"})
    with pytest.raises(ValueError, match=message):
        T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(**{"steps": 4, **change}), out, resume=True,
                extra_state={"objective": "ce"})
    with pytest.raises(ValueError, match="objective ce -> full"):
        T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=4), out, resume=True,
                extra_state={"objective": "full"})


def test_resume_says_harmless_changes(data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    first = T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=4, ckpt_every=2), out,
                    loss_fn=_stop_after(2))
    assert first["step"] == 2
    capsys.readouterr()
    res = T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=4, ckpt_every=1, chunk=5), out,
                  resume=True)
    err = capsys.readouterr().err
    assert "resuming with a changed setting: chunk 7 -> 5" in err and "ckpt_every 2 -> 1" in err
    assert res["step"] == 4


def _stop_after(n):
    ce, calls = T.ce_loss(7), {"n": 0}

    def f(m, batch):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return ce(m, batch)
    return f


KILLER = """
import json, os, sys, torch
from gemmakit.train import checkpoint as C, trainer as T, data as D
sys.path.insert(0, "tests")  # not `tests.test_trainer`: a site-packages `tests` package would shadow it
from test_trainer import model, tcfg
real = C._write_json
def dying(path, obj):
    if path.name == "state.json" and obj["step"] == 4:  # second checkpoint: its shards are written, then
        text = json.dumps(obj)                           # half of its state.json, and the process dies
        path.write_text(text[: len(text) // 2])
        os._exit(9)
    real(path, obj)
C._write_json = dying
T.train(model(), D.PackedData(sys.argv[1], "train", 16, 2), tcfg(), sys.argv[2])
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(data_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", KILLER, str(data_dir), str(out)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 9, r.stderr
    assert (out / (T.CHECKPOINT + ".tmp") / "state.json").exists()  # the half-written one is there ...
    assert C.read(out)["step"] == 2  # ... and the previous checkpoint is intact
    res = T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(), out, resume=True)
    assert res["step"] == 6 and [r["step"] for r in res["log"]] == [3, 4, 5, 6]


def test_grad_accumulation_equals_bigger_batch(data_dir, tmp_path):
    a = T.train(model(), D.PackedData(data_dir, "train", 16, 4), tcfg(steps=2), tmp_path / "a")
    b = T.train(model(), D.PackedData(data_dir, "train", 16, 2), tcfg(steps=2, grad_accum=2), tmp_path / "b")
    for x, y in zip(a["log"], b["log"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_activation_checkpointing_same_gradients(data_dir):
    batch = D.PackedData(data_dir, "train", 16, 2).next_batch()
    grads = []
    for ckpt in (False, True):
        m = model()
        if ckpt:
            apply_activation_checkpointing(m)
        T.ce_loss(5)(m, batch).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bf16_autocast_trains_close_to_fp32(data_dir, tmp_path):
    runs = {}
    for bf16 in (False, True):
        runs[bf16] = T.train(model(), D.PackedData(data_dir, "train", 16, 4),
                             tcfg(steps=5, lr=1e-2, bf16=bf16, ckpt_every=100), tmp_path / str(bf16),
                             val=D.PackedData(data_dir, "val", 16, 4))["log"]
    fp32, bf16 = [r["loss"] for r in runs[False]], [r["loss"] for r in runs[True]]
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32  # bf16 really ran, and stayed close
    assert bf16[-1] < bf16[0] - 0.5
    assert runs[True][-1]["val_loss"] == pytest.approx(runs[False][-1]["val_loss"], rel=2e-2)


FSDP = """
import json, sys, torch
from gemmakit.train import trainer as T, data as D
from gemmakit.train.parallel import init_distributed, shard
sys.path.insert(0, "tests")  # not `tests.test_trainer`: a site-packages `tests` package would shadow it
from test_trainer import model, tcfg
rank, world = init_distributed()
m = shard(model())
res = T.train(m, D.PackedData(sys.argv[1], "train", 16, 2, rank=rank, world=world), tcfg(steps=4, chunk=3),
              sys.argv[2], rank=rank)
if rank == 0:
    print(json.dumps([r["loss"] for r in res["log"]]))
"""


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one_process(data_dir, tmp_path):
    single = T.train(model(), D.PackedData(data_dir, "train", 16, 4), tcfg(steps=4, chunk=3), tmp_path / "one")
    script = tmp_path / "fsdp_run.py"
    script.write_text(FSDP)
    root = os.path.dirname(os.path.dirname(__file__))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", str(script), str(data_dir), str(tmp_path / "two")], capture_output=True, text=True,
                       cwd=root, env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout.strip().splitlines()[-1])
    assert two == pytest.approx([x["loss"] for x in single["log"]], rel=1e-5)
    # the checkpoint written under FSDP: one safetensors shard per rank, each with its half of every tensor
    from safetensors import safe_open

    state = C.read(tmp_path / "two")
    shards = sorted(n for n in state["files"] if n.endswith(".safetensors"))
    assert state["world_size"] == 2 and len(shards) == 2
    for name in shards:
        with safe_open(str(tmp_path / "two" / T.CHECKPOINT / name), "pt") as f:
            assert f.get_slice("model.model.embed_tokens.weight").get_shape() == [CFG.vocab_size // 2, CFG.d_model]


def test_the_lm_head_runs_only_where_a_target_counts():
    """The head (262,144 rows for Gemma 3) is most of a small model's step: the losses drop the rows whose
    target is IGNORE (a chat's prompts, padding) before it, in the forward and the backward, and the
    loss and gradients are those of the full computation."""
    from torch.utils.flop_counter import FlopCounterMode

    from gemmakit.train.losses import IGNORE, cross_entropy

    m = model()
    x = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    targets[:, :10] = IGNORE
    h = m.hidden(x).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as flops:
        loss = cross_entropy(m, h, targets)
    # the head's forward, its input gradient and its weight gradient: 3 products of 2 d V per kept row
    assert flops.get_total_flops() == 3 * 2 * CFG.d_model * CFG.vocab_size * 12
    loss.backward()
    logits = m.logits(h)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    grad = h.grad.clone()
    h.grad = None
    ref.backward()
    torch.testing.assert_close(grad, h.grad, rtol=1e-5, atol=1e-7)
    assert float(grad[:, :9].abs().max()) == 0.0  # rows whose target is ignored get no gradient
