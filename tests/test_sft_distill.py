"""Distillation during SFT (`gemmakit sft --teacher`): the divergences are 0 with a 0 gradient when the
teacher is the student (off- and on-policy), the loss exists only where the chat mask is 1, on-policy
batches hold the student's own samples, and the command runs end to end, resumes exactly and refuses a
teacher whose vocabulary does not contain the student's."""

import copy
import json
import os
import signal

import numpy as np
import pytest
import torch

from chat_vocab import SIZE, gemma3_vocab
from conftest import random_model, tiny_config
from gemmakit import cli, weights
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import losses
from gemmakit.train.chat_data import ChatData, prepare_chat
from gemmakit.train.losses import IGNORE
from gemmakit.train.sft import OnPolicyData, distill_loss, last_reply

CFG = tiny_config(3).replace(vocab_size=SIZE, max_seq_len=256)
SETTINGS = {"objective": "full", "k": 256, "temperature": 1.0, "alpha": 0.0, "beta": 0.0}


def user(c):
    return {"role": "user", "content": c}


def reply(c):
    return {"role": "assistant", "content": c}


CHATS = [[user(f"What is {i}?"), reply(f"It is the {i}.")] for i in range(24)] + \
        [[user("Hi"), reply("the"), user(f"and {i}"), reply(f"a {i} is")] for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_vocab(gemma3_vocab())


@pytest.fixture
def chat_dir(tmp_path, tok):
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    prepare_chat([src], tok, 3, tmp_path / "data", seq_len=64, val_fraction=0.2)
    return tmp_path / "data"


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


# (objective, beta, alpha): forward KL, JSD, reverse KL; the sampled objective with k = the vocabulary
CASES = [("full", 0.0), ("full", 0.5), ("full", 1.0), ("sampled", 0.0)]


@pytest.mark.parametrize("objective, beta", CASES)
def test_teacher_equal_to_student_gives_zero_loss_and_gradient_off_policy(chat_dir, objective, beta):
    student = random_model(CFG, seed=1)
    teacher = copy.deepcopy(student)
    loss_fn = distill_loss(teacher, {**SETTINGS, "objective": objective, "beta": beta, "k": SIZE}, chunk=16, seed=0)
    batch = ChatData(chat_dir, "train", 64, 4).next_batch()
    loss = loss_fn(student, batch)
    # Exactly 0 for the full objectives (equal logits give bit-equal log-probs: AdamW would turn even a
    # 1e-9 gradient into a full step). Sampled: the sample's probabilities are renormalized, 0 up to fp32
    # rounding of those sums.
    tol = 0.0 if objective == "full" else 1e-6
    assert abs(loss.item()) <= tol
    for g in _grads(student, loss):
        assert float(g.abs().max()) <= tol
    # and a different teacher gives a positive divergence (the test above is not vacuous)
    other = distill_loss(random_model(CFG, seed=2), {**SETTINGS, "objective": objective, "beta": beta, "k": SIZE},
                         chunk=16, seed=0)
    assert other(student, batch).item() > 1e-3


def test_on_policy_batches_hold_the_students_samples_and_teacher_equal_to_student_gives_zero(chat_dir, tok):
    student = random_model(CFG, seed=1)
    data = ChatData(chat_dir, "train", 64, 4, seed=3)
    source = ChatData(chat_dir, "train", 64, 4, seed=3)  # the same order: the data the samples replace
    on = OnPolicyData(data, student, tok.stop_ids, temperature=1.0, seed=5)
    batch = on.next_batch()
    windows = source.next_batch()["windows"]
    assert torch.equal(batch["windows"], windows)
    rows = source.conversations(windows.tolist())
    # Rebuild what each row must hold: the data's prompt, then a sample of at most the reply's length
    # that ends at its first stop id; the targets are exactly the sampled tokens.
    n_sampled = 0
    for r, convs in enumerate(rows):
        at = 0
        for ids, mask in convs:
            start, budget = last_reply(mask)
            seg = batch["segment_ids"][r] == batch["segment_ids"][r, at]
            got = batch["tokens"][r][seg].tolist()
            assert got[:start] == ids[:start].tolist()
            sample = got[start:]
            assert 1 <= len(sample) <= budget
            stops = [i for i, t in enumerate(sample) if t in tok.stop_ids]
            assert not stops or stops[0] == len(sample) - 1
            tgt = batch["targets"][r, at:at + len(got)].tolist()
            assert tgt[start - 1:len(got) - 1] == sample and set(tgt[:start - 1]) <= {IGNORE}
            n_sampled += len(sample)
            at += len(got)
    assert int((batch["targets"] != IGNORE).sum()) == n_sampled
    # the student's samples are not the data's replies (a random model does not write "It is the 3.")
    assert not torch.equal(batch["tokens"], source.windows(batch["windows"].tolist())["tokens"])
    # the same seed and position sample the same batch (what exact resume needs)
    again = OnPolicyData(ChatData(chat_dir, "train", 64, 4, seed=3), student, tok.stop_ids, seed=5).next_batch()
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    for beta in (0.0, 0.5, 1.0):
        loss = distill_loss(copy.deepcopy(student), {**SETTINGS, "beta": beta}, chunk=16, seed=0)(student, batch)
        assert loss.item() == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in _grads(student, loss))


def _masked_out_changed(teacher_h, targets):
    """teacher_h with every row whose target is IGNORE replaced by garbage (huge values, NaN, inf)."""
    out = teacher_h.clone()
    off = targets == IGNORE
    out[off] = torch.randn_like(out[off]) * 1e4
    (b0, t0), (b1, t1) = off.nonzero()[:2].tolist()
    out[b0, t0], out[b1, t1] = float("nan"), float("inf")
    return out


def test_distillation_loss_counts_only_where_the_mask_is_one(chat_dir):
    """Changing the teacher at masked-out positions (prompts, template tokens, padding) changes neither
    the loss nor the gradient, for every objective: those rows never reach either head."""
    student, teacher = random_model(CFG, seed=1), random_model(CFG, seed=2)
    batch = ChatData(chat_dir, "train", 64, 4).next_batch()
    targets = batch["targets"]
    assert 0 < int((targets == IGNORE).sum()) < targets.numel()
    with torch.no_grad():
        th = teacher.hidden(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    bad = _masked_out_changed(th, targets)
    ids = torch.randint(0, SIZE, (*targets.shape, 8), generator=torch.Generator().manual_seed(0))
    probs = torch.rand(*targets.shape, 8, generator=torch.Generator().manual_seed(1))
    bad_ids, bad_probs = ids.clone(), probs.clone()
    bad_ids[targets == IGNORE] = SIZE - 1
    bad_probs[targets == IGNORE] = float("nan")
    losses_of = {
        "full (Gemma 2)": lambda h, t: losses.distill_full(student, h, teacher, t, targets, 2.0, 0.3, chunk=16),
        **{f"jsd {b}": (lambda b: lambda h, t: losses.distill_jsd(student, h, teacher, t, targets, b, 1.5, 0.2, chunk=16))(b)
           for b in (0.0, 0.4, 1.0)},
    }
    for name, f in losses_of.items():
        h = student.hidden(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
        a = f(h, th)
        ga = _grads(student, a)
        h = student.hidden(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
        b = f(h, bad)
        gb = _grads(student, b)
        assert torch.isfinite(b) and a.item() == b.item(), name
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    for kl in (False, True):
        h = student.hidden(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
        a = losses.distill_sampled(student, h, ids, probs, targets, 0.2, chunk=16, kl=kl)
        b = losses.distill_sampled(student, h, bad_ids, bad_probs, targets, 0.2, chunk=16, kl=kl)
        assert torch.isfinite(b) and a.item() == b.item()


def test_jsd_gradients_match_autograd_on_the_written_out_formula():
    """The closed-form logit gradients of distill_jsd against autograd on GKD's formula (full logits)."""
    student, teacher = random_model(CFG, seed=1), random_model(CFG, seed=2)
    tokens = torch.randint(0, SIZE, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, SIZE, (2, 9), generator=torch.Generator().manual_seed(1))
    targets[0, :4] = IGNORE
    valid = targets != IGNORE
    with torch.no_grad():
        lt = torch.log_softmax(teacher(tokens) / 1.5, -1)
    for beta in (0.0, 0.3, 1.0):
        ls = torch.log_softmax(student(tokens) / 1.5, -1)
        if beta == 0.0:
            d = (lt.exp() * (lt - ls)).sum(-1)
        elif beta == 1.0:
            d = (ls.exp() * (ls - lt)).sum(-1)
        else:
            lm = torch.logsumexp(torch.stack([lt + np.log(beta), ls + np.log(1 - beta)]), 0)
            d = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
        ce = torch.nn.functional.cross_entropy(student(tokens)[valid], targets[valid])
        ref = 0.8 * d[valid].mean() * 1.5 ** 2 + 0.2 * ce
        g_ref = _grads(student, ref)
        out = losses.distill_jsd(student, student.hidden(tokens), teacher, teacher.hidden(tokens).detach(), targets,
                                 beta, 1.5, 0.2, chunk=5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(_grads(student, out), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- the command ------------------------------------------------------------------------------------------

@pytest.fixture
def models(tmp_path, tok, chat_dir):
    for name, seed, cfg in (("student", 3, CFG), ("teacher", 4, CFG), ("small", 5, CFG.replace(vocab_size=300))):
        weights.save(random_model(cfg, seed=seed), tmp_path / name, tokenizer=tok if cfg is CFG else None)
    return tmp_path


def _sft(tmp, out, *extra):
    return ["sft", "--model", str(tmp / "student"), "--data", str(tmp / "data"), "--out", str(tmp / out),
            "--batch-size", "2", "--steps", "6", "--warmup", "1", "--lr", "2e-2", "--lora-rank", "4",
            "--ckpt-every", "2", "--teacher", str(tmp / "teacher"), *extra]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [[], ["--on-policy", "--beta", "1"]], ids=["off-policy", "on-policy"])
def test_cli_sft_with_teacher_lowers_the_divergence_and_resumes_exactly(models, capsys, monkeypatch, extra):
    assert cli.main(_sft(models, "full", *extra)) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (models / "full" / "adapter" / "adapter_config.json").is_file() and report["val_loss"] is not None
    full = _losses(models / "full")
    assert len(full) == 6 and full[-1] < 0.9 * full[0], full
    # Interrupted (SIGINT, as Ctrl-C) during step 3: a checkpoint is written at the end of that step;
    # --resume then gives the losses of the run that never stopped, samples included.
    calls = {"n": 0}
    original = ChatData.next_batch

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(ChatData, "next_batch", next_batch)
    assert cli.main(_sft(models, "cut", *extra)) == 0
    assert "stopped by SIGINT at step 3" in capsys.readouterr().err and len(_losses(models / "cut")) == 3
    monkeypatch.setattr(ChatData, "next_batch", original)
    assert cli.main([*_sft(models, "cut", *extra), "--resume"]) == 0
    assert _losses(models / "cut") == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_cli_sft_refuses_a_teacher_that_cannot_teach(models, capsys):
    assert cli.main([*_sft(models, "r")[:-2], "--teacher", str(models / "small")]) == 1
    err = capsys.readouterr().err
    assert err == ("gemmakit: error: student vocabulary (400) is larger than the teacher vocabulary (300): the "
                   "student's ids must be teacher ids (a shared tokenizer)\n")
    assert not (models / "r").exists()
    for bad, words in ([["--on-policy", "--alpha", "0.5"], "--on-policy trains on the student's own replies"],
                       [["--objective", "sampled", "--beta", "0.5"], "estimates the forward KL only"],
                       [["--beta", "2"], "--beta must be in [0, 1]"]):
        assert cli.main([*_sft(models, "r"), *bad]) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    without = _sft(models, "r")[:-2]
    assert cli.main([*without, "--on-policy"]) == 1
    assert "--on-policy is a distillation option: it needs --teacher" in capsys.readouterr().err
