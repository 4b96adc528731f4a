"""RL: the RLOO and BOND estimators checked exactly on bandits (every sample enumerated), the KL term
against the exact KL of a tiny model, training on tiny models (a favoured token is learned; a large KL
coefficient keeps the policy at its anchor; BOND reaches the best-of-N distribution), exact resume,
EMA anchors and LoRA, WARP and WARM merges, and the commands end to end."""

import itertools
import json
import math
import os
import signal

import pytest
import torch

from conftest import random_model, tiny_config
from gemmakit.train import merge, rl
from gemmakit.train.lora import apply_lora, merge_lora


def probs_of(tuple_, p):
    return math.prod(float(p[a]) for a in tuple_)


# -- RLOO on a bandit ---------------------------------------------------------------------------------

ARMS_R = torch.tensor([0.0, 1.0, 0.3, 2.0], dtype=torch.float64)


def exact_objective(theta, ref, beta):
    """E_pi[r] - beta KL(pi || ref) for a categorical policy softmax(theta)."""
    lp, lq = torch.log_softmax(theta, 0), torch.log_softmax(ref, 0)
    return (lp.exp() * ARMS_R).sum() - beta * (lp.exp() * (lp - lq)).sum()


def rloo_surrogate(theta, ref, beta, arms):
    """The RLOO loss for one prompt whose k replies are `arms`: sum_i c_i * (-log pi(a_i))."""
    lp, lq = torch.log_softmax(theta, 0), torch.log_softmax(ref, 0)
    a = torch.tensor(arms)
    coef = rl.rloo_coefficients(ARMS_R[a][None], lp[a].detach()[None], lq[a][None], beta)
    return (coef[0] * -lp[a]).sum()


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_rloo_gradient_is_unbiased_on_a_bandit(beta):
    """Averaged over every possible set of k = 3 samples (weighted by its probability), the RLOO
    gradient equals minus the exact gradient of E[r] - beta KL(pi || ref)."""
    theta = torch.tensor([0.2, -0.5, 0.9, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.0, 0.3, -0.2, -0.6], dtype=torch.float64)
    exact = torch.autograd.grad(exact_objective(theta, ref, beta), theta)[0]
    p = torch.softmax(theta.detach(), 0)
    expected = torch.zeros(4, dtype=torch.float64)
    for arms in itertools.product(range(4), repeat=3):
        g = torch.autograd.grad(rloo_surrogate(theta, ref, beta, list(arms)), theta)[0]
        expected += probs_of(arms, p) * g
    torch.testing.assert_close(expected, -exact, rtol=1e-10, atol=1e-12)


def test_rloo_reaches_the_known_optimum_of_a_bandit():
    """Sampled RLOO updates converge to the KL-regularized optimum pi* ~ ref * exp(r / beta)."""
    beta = 0.5
    ref = torch.tensor([0.0, 0.3, -0.2, -0.6], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)
    g = torch.Generator().manual_seed(0)
    for step in range(3000):
        for group in opt.param_groups:
            group["lr"] = 0.5 / (1 + step / 300)
        arms = torch.multinomial(torch.softmax(theta.detach(), 0), 8, replacement=True, generator=g).tolist()
        opt.zero_grad()
        rloo_surrogate(theta, ref, beta, arms).backward()
        opt.step()
    best = torch.softmax(torch.log_softmax(ref, 0) + ARMS_R / beta, 0)
    torch.testing.assert_close(torch.softmax(theta.detach(), 0), best, atol=0.02, rtol=0)


# -- BOND's estimators on a bandit --------------------------------------------------------------------

BANDIT_R = [0.0, 1.0, 1.0, 2.0, 0.0]  # ties on purpose: binary checks tie all the time


def best_of_n_brute_force(p, n):
    """pi_BoN by drawing every n-tuple and picking its best (ties uniformly)."""
    out = [0.0] * len(p)
    for t in itertools.product(range(len(p)), repeat=n):
        top = max(BANDIT_R[a] for a in t)
        winners = [a for a in t if BANDIT_R[a] == top]
        for a in winners:
            out[a] += probs_of(t, p) / len(winners)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [2, 3])
def test_best_of_n_weights_are_an_unbiased_estimate_of_best_of_n(n):
    p = torch.tensor([0.3, 0.1, 0.25, 0.05, 0.3], dtype=torch.float64)
    k = 4
    est = torch.zeros(5, dtype=torch.float64)
    for t in itertools.product(range(5), repeat=k):
        w = rl.best_of_n_weights(torch.tensor([[BANDIT_R[a] for a in t]]), n)[0]
        assert abs(float(w.sum()) - 1) < 1e-12
        for a, wi in zip(t, w.tolist()):
            est[a] += probs_of(t, p) * wi
    torch.testing.assert_close(est, best_of_n_brute_force(p, n), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_bond_log_ratio_is_the_exact_best_of_n_with_ties(n):
    """pi_a(y) * exp(log ratio) from the exact quantiles equals pi_BoN(y) drawn by brute force."""
    p = torch.tensor([0.3, 0.1, 0.25, 0.05, 0.3], dtype=torch.float64)
    r = torch.tensor(BANDIT_R, dtype=torch.float64)
    le = torch.stack([p[r <= x].sum() for x in r])
    lt = torch.stack([p[r < x].sum() for x in r])
    torch.testing.assert_close(p * rl.bon_log_ratio(le, lt, n).exp(), best_of_n_brute_force(p, n), rtol=1e-10, atol=0)


def test_bond_log_ratio_estimate_counts_the_reply_itself():
    """With the anchor's rewards [0, 0, 1] and the reply's: F, F< of a reply scoring 1 are 4/4 and 2/4."""
    est = rl.bond_log_ratio(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]]), 2)
    want = [math.log(1 + 0.5), math.log(0.75)]  # F + F<: (1 + 2/4); 0-reward reply: F = 3/4, F< = 0
    torch.testing.assert_close(est[0], torch.tensor(want, dtype=torch.float64))


# -- the KL term on a tiny model ------------------------------------------------------------------------

def test_kl_term_equals_the_exact_kl_on_a_tiny_vocabulary():
    """E_pi[sum_t log pi - log pi_ref] over every 2-token reply (sequence_logprobs on left and right
    padding) equals the exact KL by the chain rule over full next-token distributions."""
    config = tiny_config(3).replace(vocab_size=12)
    pol, ref = random_model(config, seed=1, std=0.3), random_model(config, seed=2, std=0.3)
    prompts = [[2, 5], [2, 7, 3, 9]]  # two lengths: the batch is padded
    replies = [[a, b] for a in range(12) for b in range(12)]
    for prompt in prompts:
        lp = rl.sequence_logprobs(pol, [prompt] * len(replies), replies)
        lq = rl.sequence_logprobs(ref, [prompt] * len(replies), replies)
        assert abs(float(lp.exp().sum()) - 1) < 1e-5
        estimator = float((lp.exp() * (lp - lq)).sum())
        with torch.no_grad():
            first = [torch.log_softmax(m(torch.tensor([prompt]))[0, -1].double(), -1) for m in (pol, ref)]
            seconds = [torch.log_softmax(m(torch.tensor([prompt + [a] for a in range(12)]))[:, -1].double(), -1)
                       for m in (pol, ref)]
        exact = float((first[0].exp() * (first[0] - first[1])).sum())
        exact += float((first[0].exp() * (seconds[0].exp() * (seconds[0] - seconds[1])).sum(-1)).sum())
        assert abs(estimator - exact) < 1e-5, (estimator, exact)


# -- training on tiny models ----------------------------------------------------------------------------

PROMPTS = [[2, 10 + i, 20 + i] for i in range(4)]


def token_task(target, prompts=PROMPTS):
    def score(idx, replies):
        r = torch.tensor([float(y[0] == target) for y in replies], dtype=torch.float64)
        return r, {"hit": r}
    return rl.Task(prompts, score)


def next_token_probs(model, prompts=PROMPTS):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor(prompts))[:, -1].double(), -1)


def exact_kl(a, b):
    pa, pb = next_token_probs(a), next_token_probs(b)
    return (pa * (pa.log() - pb.log())).sum(-1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread avoids OpenMP's waiting (10x faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_policy_learns_a_favoured_token_and_a_large_kl_keeps_it_at_the_anchor(tmp_path):
    config = tiny_config(3)
    p0 = next_token_probs(random_model(config, seed=1))
    target = int(p0.mean(0).argsort()[-5])  # about 1-3% likely at first
    results = {}
    for kl in (0.0, 100.0):
        policy = random_model(config, seed=1)
        anchor, _ = rl.anchors(policy, ema=False)
        cfg = rl.RLConfig(steps=30, batch_size=4, k=8, max_new_tokens=1, kl=kl, lr=3e-3, ckpt_every=100)
        log = rl.train(policy, token_task(target), cfg, tmp_path / f"kl{kl}", anchor=anchor)["log"]
        results[kl] = (next_token_probs(policy)[:, target], exact_kl(policy, anchor), log)
    hit, kl_free, log = results[0.0]
    assert float(p0[:, target].max()) < 0.05 and float(hit.min()) > 0.95 and log[-1]["reward"] > 0.9
    hit, kl_anchored, log = results[100.0]  # the optimum is pi_anchor * exp(r / 100): the anchor, nearly
    assert float((hit - p0[:, target]).abs().max()) < 0.02
    assert float(kl_anchored.max()) < 0.15 < 3 < float(kl_free.min())


def test_bond_with_a_fixed_anchor_reaches_the_best_of_n_distribution(tmp_path):
    """The policy's probability of the rewarded token moves from p to about 1 - (1 - p)^N (best of N)."""
    config = tiny_config(3)
    policy = random_model(config, seed=1)
    p0 = next_token_probs(policy)
    target = int(p0.mean(0).argmax())
    anchor, _ = rl.anchors(policy, ema=False)
    cfg = rl.RLConfig(method="bond", steps=40, batch_size=4, k=8, bond_n=4, max_new_tokens=1, lr=1e-2, ckpt_every=100)
    rl.train(policy, token_task(target), cfg, tmp_path / "bond", anchor=anchor)
    want = 1 - (1 - p0[:, target]) ** 4
    got = next_token_probs(policy)[:, target]
    assert float((got - want).abs().max()) < 0.1 and float(got.mean()) > 2 * float(p0[:, target].mean()), (got, want)


def test_an_interrupted_run_resumes_exactly(tmp_path):
    """Ctrl-C in step 2 checkpoints after it; --resume then gives the log lines and weights (LoRA
    adapters and the EMA anchor) of a run that was never stopped."""
    config = tiny_config(2)
    cfg = rl.RLConfig(steps=4, batch_size=2, k=3, max_new_tokens=3, kl=0.1, anchor_ema=0.3, lr=1e-2, ckpt_every=10)

    def run(out, task, resume=False):
        policy = random_model(config, seed=4)
        apply_lora(policy, 2, 4.0, generator=torch.Generator().manual_seed(0))
        anchor, start = rl.anchors(policy, ema=True)
        return policy, anchor, rl.train(policy, task, cfg, out, anchor=anchor, start=start, resume=resume)

    whole, whole_anchor, _ = run(tmp_path / "whole", token_task(7))
    calls = []

    def interrupting(idx, replies):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C during step 2
        return token_task(7).score(idx, replies)

    _, _, res = run(tmp_path / "cut", rl.Task(PROMPTS, interrupting))
    assert res["interrupted"] == "SIGINT" and res["step"] == 2
    policy, anchor, res = run(tmp_path / "cut", token_task(7), resume=True)
    assert res["step"] == 4

    def lines(out):
        return [{k: v for k, v in json.loads(ln).items() if k not in ("time", "cpu")}  # clocks differ
                for ln in (out / "log.jsonl").read_text().splitlines()]

    assert lines(tmp_path / "cut") == lines(tmp_path / "whole") and len(lines(tmp_path / "whole")) == 4
    for a, b in [(policy, whole), (anchor, whole_anchor)]:
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="kl 0.1 -> 0.2"):
        cfg.kl = 0.2
        run(tmp_path / "cut", token_task(7), resume=True)


def test_micro_batches_of_prompts_compute_the_same_step(tmp_path):
    """All prompts in one forward/backward, or one prompt (with its replies, and BOND's anchor replies) at
    a time, log the same step: the advantages are per prompt, the normalization is the step's."""
    logs = []
    for mb in (0, 1):
        policy = random_model(tiny_config(1), seed=5)
        anchor, _ = rl.anchors(policy, ema=False)
        cfg = rl.RLConfig(method="bond", steps=1, batch_size=2, k=3, bond_n=2, max_new_tokens=3, lr=1e-3,
                          micro_batch=mb, ckpt_every=10)
        logs.append(rl.train(policy, token_task(9), cfg, tmp_path / str(mb), anchor=anchor)["log"][0])
    for key in ("reward", "anchor_reward", "kl", "loss", "grad_norm"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-5, abs=1e-6), key


# -- anchors, LoRA and merges -------------------------------------------------------------------------

def test_merged_lora_weights_and_the_ema_anchor():
    policy = random_model(tiny_config(3), seed=2)
    apply_lora(policy, 2, 8.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0.0, 0.1)  # B starts at zero: give the adapters something to fold
    merged = rl.merged_state(policy)
    import copy

    folded = copy.deepcopy(policy)
    merge_lora(folded)
    assert merged.keys() == folded.state_dict().keys()
    for name, w in folded.state_dict().items():
        torch.testing.assert_close(merged[name], w, rtol=0, atol=1e-6)
    anchor = rl.plain_copy(random_model(tiny_config(3), seed=3))
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    rl.ema_update(anchor, policy, 0.25)
    for name, w in anchor.state_dict().items():
        torch.testing.assert_close(w, 0.75 * before[name] + 0.25 * merged[name])


@pytest.fixture
def tiny_cli(tmp_path):
    """A tiny Gemma 3 as an HF directory with its tokenizer, prompts, and a reward preferring long replies."""
    from gguf_files import tiny_vocab, write_gguf

    write_gguf(tmp_path / "tiny.gguf", random_model(tiny_config(3).replace(vocab_size=320)), tiny_vocab(320))
    assert run("convert", tmp_path / "tiny.gguf", tmp_path / "base") == 0
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "answer": i + 1}) + "\n"
                                                   for i in range(6)))
    (tmp_path / "length.py").write_text("def length(record, reply):\n    return float(len(reply))\n")
    return tmp_path


def run(*argv):
    from gemmakit import cli

    return cli.main([str(a) for a in argv])


def test_cli_rl_train_eval_and_warp(tiny_cli, capsys):
    t = tiny_cli
    capsys.readouterr()
    common = ["rl", "train", "--model", t / "base", "--prompts", t / "prompts.jsonl", "--eval-prompts",
              t / "prompts.jsonl", "--reward", f"python:{t / 'length.py'}:length", "--reward", "exact",
              "--reward-weights", 1, 0, "--steps", 2, "--batch-size", 2, "--max-new-tokens", 3, "--lr", 1e-2,
              "--no-compile", "--stop", "\n"]
    assert run(*common, "--k", 2, "--lora-rank", 2, "--out", t / "rloo") == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 2 and report["adapter"] == str(t / "rloo" / "adapter") and "eval_exact" in report
    log = [json.loads(ln) for ln in (t / "rloo" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and "eval_reward" in log[0] and "kl" in log[1]
    assert run(*common, "--k", 3, "--method", "bond", "--bond-n", 2, "--anchor-ema", 0.5, "--seed", 1,
               "--out", t / "bond") == 0, capsys.readouterr().err
    log = [json.loads(ln) for ln in (t / "bond" / "log.jsonl").read_text().splitlines()]
    assert "anchor_reward" in log[-1] and "kl_start" in log[-1]
    # a finished run is not overwritten; bad settings are refused before anything loads
    assert run(*common, "--k", 2, "--lora-rank", 2, "--out", t / "rloo") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run(*common, "--k", 1, "--out", t / "k1") == 1
    assert "--k must be at least 2" in capsys.readouterr().err
    assert run("rl", "eval", "--model", t / "rloo" / "model", "--prompts", t / "prompts.jsonl", "--reward", "exact",
               "--max-new-tokens", 3, "--no-compile", "--kl-base", t / "base", "--batch-size", 4) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 6 and 0 <= result["exact"] <= 1 and "kl_to_base" in result
    # WARP: SLERP of the two runs' task vectors, then halfway back to the init
    assert run("warp", t / "rloo" / "model", t / "bond" / "model", "--base", t / "base", "--eta", 0.5,
               "--out", t / "warp") == 0, capsys.readouterr().err
    from gemmakit import weights

    base, a, b, w = (weights.load_state_dict(p)
                     for p in (t / "base", t / "rloo" / "model", t / "bond" / "model", t / "warp"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        want = base[name] + 0.5 * merge.slerp(a[name] - base[name], b[name] - base[name], 0.5)
        torch.testing.assert_close(w[name], want, rtol=1e-6, atol=1e-6)
    assert json.loads((t / "warp" / "merge.json").read_text())["eta"] == 0.5
    assert run("warp", t / "rloo" / "model", t / "bond" / "model", "--base", t / "base", "--eta", 2,
               "--out", t / "warp2") == 1
    assert "--eta must be in [0, 1]" in capsys.readouterr().err


def test_help_gives_every_default():
    """As for the training commands: every option of reward, rl, warm and warp says its default."""
    import argparse

    from gemmakit import cli

    def subparsers(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    top = subparsers(cli.build_parser())
    parsers = {**{f"reward {k}": v for k, v in subparsers(top["reward"]).items()},
               **{f"rl {k}": v for k, v in subparsers(top["rl"]).items()}, "warm": top["warm"], "warp": top["warp"]}
    for name, parser in parsers.items():
        for a in parser._actions:
            if not a.option_strings or a.required or a.help == argparse.SUPPRESS or a.nargs == 0:
                continue  # positionals, required options, --help/--debug and on/off switches
            assert "default" in (a.help or ""), f"{name} {a.option_strings[0]}: no default in {a.help!r}"
            if a.default not in (None, argparse.SUPPRESS):
                assert str(a.default) in a.help, f"{name} {a.option_strings[0]}: {a.default} not in {a.help!r}"
