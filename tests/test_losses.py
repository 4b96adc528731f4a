"""Losses: CE against F.cross_entropy, distillation against the formulas written out on full logits,
chunked gradients against unchunked ones, and sampled distillation equal to full on a covered support."""

import math

import pytest
import torch
import torch.nn.functional as F

from gemmakit.config import get_config
from gemmakit.model import build
from gemmakit.train import losses

TINY = get_config("gemma3-270m").replace(name="tiny", vocab_size=96, d_model=32, n_layers=2, n_heads=2,
                                         n_kv_heads=1, head_dim=16, intermediate_size=64, sliding_window=8,
                                         layer_types=("local", "global"))


def tiny(seed: int, softcap: float | None = None):
    torch.manual_seed(seed)
    m = build(TINY.replace(final_softcap=softcap), "cpu")
    m.init_weights(std=0.3)
    return m


def data(seed=0, b=2, t=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (b, t), generator=g)
    targets = torch.randint(0, TINY.vocab_size, (b, t), generator=g)
    targets[0, 2] = losses.IGNORE
    return tokens, targets


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_cross_entropy_matches_torch_values_and_grads(chunk):
    m = tiny(0, softcap=30.0)
    tokens, targets = data()
    ref = F.cross_entropy(m(tokens).flatten(0, 1), targets.flatten(), ignore_index=losses.IGNORE)
    g_ref = grads(m, ref)
    out = losses.cross_entropy(m, m.hidden(tokens), targets, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(m, out), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def full_reference(s_logits, t_logits, targets, T, alpha):
    """The straightforward implementation: whole [tokens x vocab] logits of both models."""
    valid = targets != losses.IGNORE
    p = torch.softmax(t_logits / T, -1)
    kd = -(p * torch.log_softmax(s_logits / T, -1)).sum(-1)
    kd = kd[valid].mean() * T * T
    ce = F.cross_entropy(s_logits, targets, ignore_index=losses.IGNORE)
    return (1 - alpha) * kd + alpha * ce


@pytest.mark.parametrize("chunk,T,alpha", [(1, 1.0, 0.0), (4, 2.0, 0.3), (1000, 0.7, 1.0)])
def test_full_distillation_chunked_equals_unchunked(chunk, T, alpha):
    student, teacher = tiny(0), tiny(1)
    tokens, targets = data()
    with torch.no_grad():
        t_h = teacher.hidden(tokens)
        t_logits = teacher.logits(t_h).flatten(0, 1)
    ref = full_reference(student(tokens).flatten(0, 1), t_logits, targets.flatten(), T, alpha)
    g_ref = grads(student, ref)
    out = losses.distill_full(student, student.hidden(tokens), teacher, t_h, targets, T, alpha, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(student, out), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The teacher receives no gradient.
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_full_is_cross_entropy_against_teacher():
    # The Gemma 2 objective is the cross-entropy H(P_T, P_S) = KL(P_T || P_S) + H(P_T): its minimum
    # over students is the teacher's entropy, reached when the student equals the teacher.
    teacher = tiny(1)
    tokens, targets = data()
    with torch.no_grad():
        h = teacher.hidden(tokens)
        p = torch.softmax(teacher.logits(h), -1)
        entropy = -(p * p.log()).sum(-1).flatten()[targets.flatten() != losses.IGNORE].mean()
        same = losses.distill_full(teacher, h, teacher, h, targets)
    torch.testing.assert_close(same, entropy, rtol=1e-5, atol=1e-6)


def test_sample_teacher_without_replacement_in_proportion():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]))
    ids, probs = losses.sample_teacher(logits.expand(20000, 5), 2, g)
    assert all(len(set(r.tolist())) == 2 for r in ids[:200])  # distinct ids per position
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])[ids])
    # First pick is a draw from p.
    freq = torch.bincount(ids[:, 0], minlength=5).float() / len(ids)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.015, rtol=0)
    # P(id in sample of 2) = p_i + sum_j p_j p_i / (1 - p_j): exact without-replacement inclusion.
    p = [0.5, 0.3, 0.15, 0.05, 0.0]
    incl = torch.tensor([pi + sum(pj * pi / (1 - pj) for j, pj in enumerate(p) if j != i) for i, pi in enumerate(p)])
    got = torch.zeros(5).index_add_(0, ids.flatten(), torch.ones(ids.numel())) / len(ids)
    torch.testing.assert_close(got, incl, atol=0.015, rtol=0)
    assert (ids != 4).all()  # zero-probability ids are never drawn before positive ones


@pytest.mark.parametrize("k_extra", [0, 5])
def test_sampled_distillation_equals_full_when_sample_covers_support(k_extra):
    student, teacher = tiny(0), tiny(1)
    tokens, targets = data()
    with torch.no_grad():
        t_h = teacher.hidden(tokens)
        t_logits = teacher.logits(t_h)
    if k_extra:
        # A teacher with a support of 40 tokens, sampled with k = 45 > 40 (5 padding slots of p = 0).
        t_logits[..., 40:] = float("-inf")
    k = 40 + k_extra if k_extra else TINY.vocab_size
    ids, probs = losses.sample_teacher(t_logits, k, torch.Generator().manual_seed(0))
    ref = full_reference(student(tokens).flatten(0, 1), t_logits.flatten(0, 1), targets.flatten(), 1.0, 0.0)
    g_ref = grads(student, ref)
    out = losses.distill_sampled(student, student.hidden(tokens), ids, probs.half(), targets, chunk=3)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)  # fp16 storage of the probabilities
    out32 = losses.distill_sampled(student, student.hidden(tokens), ids, probs, targets, chunk=3)
    torch.testing.assert_close(out32, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(student, out32), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sampled_distillation_renormalizes_inside_the_sample():
    student = tiny(0)
    tokens, targets = data(t=3)
    h = student.hidden(tokens)
    ids = torch.tensor([5, 9, 11]).expand(2, 3, 3)
    probs = torch.tensor([0.2, 0.1, 0.1]).expand(2, 3, 3)  # renormalized: 0.5, 0.25, 0.25
    out = losses.distill_sampled(student, h, ids, probs, targets)
    logp = torch.log_softmax(student.logits(h), -1)[..., [5, 9, 11]]
    per_tok = -(logp * torch.tensor([0.5, 0.25, 0.25])).sum(-1)
    torch.testing.assert_close(out, per_tok.flatten()[targets.flatten() != losses.IGNORE].mean())


def test_eval_mode_has_no_graph_and_same_value():
    m = tiny(0)
    tokens, targets = data()
    with torch.no_grad():
        h = m.hidden(tokens)
        out = losses.cross_entropy(m, h, targets, chunk=2)
    assert not out.requires_grad
    ref = F.cross_entropy(m(tokens).flatten(0, 1), targets.flatten(), ignore_index=losses.IGNORE)
    assert math.isclose(out.item(), ref.item(), rel_tol=1e-6)
