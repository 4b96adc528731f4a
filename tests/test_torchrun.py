"""Training commands under `torchrun --nproc-per-node 2 -m gemmakit ...` (CPU, gloo, tiny models): the
same losses as one process with the same global batch, exact resume after SIGTERM to one rank and after
SIGKILL of the whole job, resharding a checkpoint from 2 ranks onto 1 and from 1 onto 2, distillation
with a teacher sharded like the student, SFT with a teacher and LoRA, and FSDP2's bf16 mixed precision
policy (fp32 master weights).

Every run uses --chunk 3: the ranks then call the LM head a different number of times per step (their
micro-batches keep different numbers of targets), which must not pair collectives up wrongly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chat_vocab import SIZE, gemma3_vocab
from conftest import random_model, tiny_config
from gguf_files import tiny_vocab, write_gguf
from gemmakit import cli, weights
from gemmakit.train import checkpoint as C
from gemmakit.train import trainer as T

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find a rank's process")]

V = 320
STEPS = 40  # long enough that a signal sent after a few steps arrives before the end
WORDS = "this is the thing the hat is on a thesis on the sea".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Prepared data, a tiny student config and a tiny GGUF teacher (its tokenizer is the data's)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    write_gguf(tmp / "tiny.gguf", random_model(tiny_config(3).replace(vocab_size=V)), tiny_vocab(V))
    docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 9)) for i in range(120)]
    (tmp / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp / "student.json").write_text(json.dumps({
        "base": "gemma3-270m", "vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 1, "n_kv_heads": 1,
        "head_dim": 8, "intermediate_size": 32, "sliding_window": 4, "max_seq_len": 256}))
    assert cli.main(["data", "prepare", str(tmp / "d.jsonl"), "--out", str(tmp / "data"), "--tokenizer",
                     str(tmp / "tiny.gguf")]) == 0
    return tmp


def args(tmp, out, batch, *extra, cmd="train", steps=STEPS, ckpt_every=1000):
    """A training command line; the global batch is 4 sequences (batch x ranks)."""
    return [cmd, "--data", str(tmp / "data"), "--out", str(tmp / out), "--model", str(tmp / "student.json"),
            "--seq-len", "8", "--batch-size", str(batch), "--steps", str(steps), "--warmup", "2", "--lr", "1e-2",
            "--chunk", "3", "--ckpt-every", str(ckpt_every), *extra]


def launch(tmp, argv, name):
    """`torchrun --nproc-per-node 2 -m gemmakit ARGV` in its own session; stdout/stderr to files."""
    out, err = open(tmp / f"{name}.out", "w"), open(tmp / f"{name}.err", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gemmakit",
           *argv]
    return subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(tmp, p, name, timeout=300):
    code = p.wait(timeout)
    return code, (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text()


def torchrun(tmp, argv, name):
    code, out, err = finish(tmp, launch(tmp, argv, name), name)
    assert code == 0, err[-3000:]
    return out, err


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / T.LOG).read_text().splitlines()]


def wait_for_steps(run_dir, n, p, timeout=240):
    """Until the run's log has n steps (its process still running)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert p.poll() is None, "the run ended before it was interrupted"
        if (run_dir / T.LOG).exists() and len((run_dir / T.LOG).read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{run_dir}: fewer than {n} steps after {timeout} s")


def descendants(pid):
    """The process ids under `pid` (torchrun starts each worker in a session of its own)."""
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            children = [int(c) for c in (task / "children").read_text().split()]
            todo += children
            found += children
    return found


def rank_pid(pid, rank):
    """The process id of torchrun's worker `rank` (a descendant of `pid` with RANK=rank)."""
    for p in descendants(pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
            return p
    raise LookupError(f"no rank {rank} under process {pid}")


def kill_job(p):
    """SIGKILL to torchrun and every worker at once, as a scheduler ends a job: nothing runs a handler."""
    pids = [p.pid, *descendants(p.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    p.wait(60)
    for pid in pids[1:]:
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tiny):
    """The uninterrupted single-process run (batch 4): its per-step losses."""
    assert cli.main(args(tiny, "ref", 4)) == 0
    return losses(tiny / "ref")


def test_train_two_ranks_equals_one_process(tiny, reference):
    out, err = torchrun(tiny, args(tiny, "two", 2), "two")
    assert losses(tiny / "two") == pytest.approx(reference, rel=1e-5)
    assert len(out.splitlines()) == 1 and json.loads(out)["step"] == STEPS  # only rank 0 reports
    a, b = load_file(tiny / "ref" / "model" / "model.safetensors"), load_file(tiny / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert (tiny / "two" / "model" / "tokenizer.model").is_file()  # rank 0 saved the whole model directory


def test_sigterm_to_one_rank_then_resume_on_one_rank(tiny, reference, capsys):
    p = launch(tiny, args(tiny, "term", 2), "term")
    wait_for_steps(tiny / "term", 3, p)
    os.kill(rank_pid(p.pid, 1), signal.SIGTERM)  # rank 1 only: both stop after the same step
    code, out, err = finish(tiny, p, "term")
    assert code == 0, err[-3000:]
    step = C.read(tiny / "term")["step"]
    assert 3 <= step < STEPS and f"stopped by SIGTERM at step {step}" in err
    assert C.read(tiny / "term")["world_size"] == 2
    # 2 ranks of batch 2 -> 1 process of batch 4: the same global batch, the checkpoint resharded
    capsys.readouterr()
    assert cli.main(args(tiny, "term", 4, "--resume")) == 0
    err = capsys.readouterr().err
    assert "resharding: the checkpoint was written by 2 ranks, this run has 1 rank\n" in err
    assert "resuming with a changed setting: batch_size 2 -> 4" in err
    assert losses(tiny / "term") == pytest.approx(reference, rel=1e-5)


def test_resume_one_rank_onto_two_then_sigkill_of_the_job_and_resume(tiny, reference, monkeypatch):
    ce, calls = T.ce_loss, {"n": 0}

    def stopping(chunk):  # the single-process run stops itself during its step 3
        f = ce(chunk)

        def g(model, batch):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return f(model, batch)
        return g

    monkeypatch.setattr(T, "ce_loss", stopping)
    assert cli.main(args(tiny, "kill", 4, ckpt_every=2)) == 0
    monkeypatch.setattr(T, "ce_loss", ce)
    assert C.read(tiny / "kill")["step"] == 3 and C.read(tiny / "kill")["world_size"] == 1
    # 1 process -> 2 ranks, then the whole job is killed (no handler runs) after a checkpoint
    p = launch(tiny, args(tiny, "kill", 2, "--resume", ckpt_every=2), "kill1")
    wait_for_steps(tiny / "kill", 9, p)  # step 9 started after step 8's checkpoint was in place
    kill_job(p)
    assert "resharding: the checkpoint was written by 1 rank, this run has 2 ranks" in (tiny / "kill1.err").read_text()
    step = C.read(tiny / "kill")["step"]
    assert 8 <= step < STEPS and step % 2 == 0 and C.read(tiny / "kill")["world_size"] == 2
    torchrun(tiny, args(tiny, "kill", 2, "--resume", ckpt_every=2), "kill2")
    assert losses(tiny / "kill") == pytest.approx(reference, rel=1e-5)  # steps 1-3, 4-step, step+1-40


@pytest.mark.parametrize("placement", ["sharded", "replicated"])
def test_distill_two_ranks_equals_one_process(tiny, placement):
    """The teacher sharded like the student (default), or a whole bf16 copy per rank (--replicate-teacher,
    which one process uses too)."""
    teacher = ["--teacher", str(tiny / "tiny.gguf"), "--temperature", "2.0", "--alpha", "0.25",
               *(["--replicate-teacher"] if placement == "replicated" else [])]
    one, two = f"d1-{placement}", f"d2-{placement}"
    assert cli.main(args(tiny, one, 4, *teacher, cmd="distill", steps=6)) == 0
    torchrun(tiny, args(tiny, two, 2, *teacher, cmd="distill", steps=6), two)
    assert losses(tiny / two) == pytest.approx(losses(tiny / one), rel=1e-5)
    assert C.read(tiny / two)["extra"].get("replicate_teacher", False) == (placement == "replicated")


def test_bf16_policy_trains_like_one_process_with_fp32_master_weights(tiny):
    assert cli.main(args(tiny, "b1", 4, "--bf16", steps=6)) == 0
    torchrun(tiny, args(tiny, "b2", 2, "--bf16", steps=6), "b2")  # bf16 compute and all-gathers, fp32 reduce
    one, two = losses(tiny / "b1"), losses(tiny / "b2")
    assert two == pytest.approx(one, rel=1e-2) and two != one  # bf16 rounding differs, the training does not
    weights = load_file(tiny / "b2" / "model" / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}  # the master weights the optimizer updated


def test_sft_with_teacher_and_lora_two_ranks_equals_one_process(tmp_path):
    from gemmakit.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_vocab(gemma3_vocab())
    weights.save(random_model(tiny_config(3).replace(vocab_size=SIZE, max_seq_len=256), seed=3), tmp_path / "base",
                 tokenizer=tok)
    chats = [[{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"It is the {i}."}]
             for i in range(40)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    assert cli.main(["data", "prepare", "--chat", str(tmp_path / "chats.jsonl"), "--tokenizer", str(tmp_path / "base"),
                     "--out", str(tmp_path / "data"), "--seq-len", "64"]) == 0
    base = str(tmp_path / "base")
    argv = ["sft", "--model", base, "--teacher", base, "--alpha", "0.5", "--lora-rank", "2", "--data",
            str(tmp_path / "data"), "--steps", "4", "--warmup", "1", "--lr", "1e-2", "--chunk", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "s1"), "--batch-size", "4"]) == 0
    torchrun(tmp_path, [*argv, "--out", str(tmp_path / "s2"), "--batch-size", "2"], "s2")
    assert losses(tmp_path / "s2") == pytest.approx(losses(tmp_path / "s1"), rel=1e-5)
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):  # LoRA merged, and alone
        a, b = load_file(tmp_path / "s1" / name), load_file(tmp_path / "s2" / name)
        for k in a:
            # The losses agree to 1e-5 (they test the steps); the saved weights up to summation order: Adam scales
            # each update to about lr, so where a gradient is near 0 summation order moves a weight by a
            # fraction of the step (1.2e-4 seen under load). A tenth of one step (1e-3) still catches a wrong,
            # unmerged or rank-local save, each off by whole steps.
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-3)


def test_qat_two_ranks_equals_one_process(tiny, capsys):
    """QAT's fake-quantized blocks sharded by FSDP2 (each rank rounds whole gathered matrices) and the frozen
    original sharded like them: the same loss, update and evaluation as one process.

    One step: the two runs differ only in summation order (~1e-7), and from the second step on, wherever that
    moves a weight across a Q4_0 rounding boundary the rounded weight jumps a whole grid step and the two
    trajectories part (a 6-step run saw 0.8% by step 6): more steps would test the rounding's chaos, not
    the sharding."""
    from gemmakit.gguf import load_gguf

    argv = ["qat", "--model", str(tiny / "tiny.gguf"), "--format", "q4_0", "--data", str(tiny / "data"),
            "--seq-len", "8", "--steps", "1", "--warmup", "0", "--lr", "1e-2", "--chunk", "3"]
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(tiny / "q1"), "--batch-size", "4"]) == 0
    one = json.loads(capsys.readouterr().out)
    out, _ = torchrun(tiny, [*argv, "--out", str(tiny / "q2"), "--batch-size", "2"], "q2")
    assert len(out.splitlines()) == 1  # only rank 0 reports
    two = json.loads(out)
    assert losses(tiny / "q2") == pytest.approx(losses(tiny / "q1"), rel=1e-5)
    assert two["format"] == "q4_0" and two["kl"] == pytest.approx(one["kl"], rel=1e-4)  # the gathered model
    a, b = load_file(tiny / "q1" / "model" / "model.safetensors"), load_file(tiny / "q2" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # Adam's first step is about lr * sign(gradient): where a gradient is near 0, summation order moves the
        # update (~1e-5 in one run, 5e-4 for one weight of 2,048 in another): compared to a tenth of the 1e-2 step.
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3)
    before = load_gguf(tiny / "tiny.gguf", progress=False)[1]
    assert any(not torch.equal(a[k], before[k]) for k in a if k in before)  # the step moved the weights


def test_reward_train_two_ranks_equals_one_process(tiny):
    pairs = [{"prompt": f"{WORDS[i % len(WORDS)]} {WORDS[(i * 3) % len(WORDS)]}", "chosen": " the sea",
              "rejected": f" {WORDS[(i * 5) % len(WORDS)]} hat"} for i in range(24)]
    (tiny / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    argv = ["reward", "train", "--model", str(tiny / "tiny.gguf"), "--data", str(tiny / "pairs.jsonl"),
            "--val-fraction", "0.25", "--steps", "5", "--warmup", "1", "--lr", "1e-2", "--lora-rank", "2"]
    assert cli.main([*argv, "--out", str(tiny / "r1"), "--batch-size", "4"]) == 0
    out, _ = torchrun(tiny, [*argv, "--out", str(tiny / "r2"), "--batch-size", "2"], "r2")
    assert losses(tiny / "r2") == pytest.approx(losses(tiny / "r1"), rel=1e-5)
    one, two = (json.loads((tiny / r / "eval.json").read_text()) for r in ("r1", "r2"))
    assert json.loads(out) == two  # only rank 0 reports, and evaluates the gathered model
    assert two["val_accuracy"] == one["val_accuracy"] and two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)


def test_rl_train_refused_under_torchrun_with_one_message(tiny):
    (tiny / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    code, _, err = finish(tiny, launch(tiny, ["rl", "train", "--model", str(tiny / "tiny.gguf"), "--prompts",
                                              str(tiny / "prompts.jsonl"), "--reward", "exact", "--out",
                                              str(tiny / "rl")], "rl"), "rl")
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("gemmakit: error:")]
    assert errors == ["gemmakit: error: gemmakit rl train runs in one process, not under torchrun: each step samples "
                      "with the engine's compiled decode, which needs the whole policy in one process"]
