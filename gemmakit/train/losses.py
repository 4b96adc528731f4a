"""Training losses: cross-entropy, full distillation (Gemma 2) and sampled-logit distillation (Gemma 3).

Every loss starts from HIDDEN states, not logits, and goes through the LM head a chunk of tokens at a
time. With Gemma's 262,144-entry vocabulary, 4,096 tokens of fp32 logits are 4.3 GB per model; the
chunked losses never hold more than `chunk` tokens of them (student and teacher) at once, in the
forward or in the backward.

How the backward stays bounded: `_ChunkedHeadLoss` computes each chunk's loss AND its gradient
(w.r.t. the chunk's hidden states and the tied head weight) inside the forward pass, then frees the
chunk's logits. The backward only scales the stored gradients by the incoming grad. In memory this
is what activation checkpointing each chunk would give, without recomputing the student's and the
teacher's heads in the backward (the head is most of the compute of a small model with this
vocabulary). The gradient w.r.t. the logits is written in closed form (softmax minus target, see
each loss) rather than taken through autograd, which saves several passes over [chunk x vocab]
arrays; the tests check it against autograd on the plain formulas. The head itself (matmul and
Gemma 2's soft-cap) is differentiated by autograd. Without a gradient (evaluation) the chunks are
simply evaluated under no_grad.

All losses return the MEAN over the tokens whose target is not `IGNORE` (-100).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

IGNORE = -100
# A chunk's loss: (student logits [n, V] fp32, token slice, want_grad) ->
#   (summed loss over the chunk's tokens, d loss / d logits [n, V] or None when not wanted).
ChunkFn = Callable[[Tensor, slice, bool], tuple[Tensor, Tensor | None]]


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over chunks of chunk_fn(head(h[chunk]), chunk), gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, head: Callable[[Tensor], Tensor], chunk_fn: ChunkFn,
                chunk: int) -> Tensor:  # type: ignore[override]
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            with torch.enable_grad():
                hc = h[sl].detach().requires_grad_(True)
                z = head(hc)
            loss, dz = chunk_fn(z.detach().float(), sl, True)
            inputs = [hc] + ([weight] if grad_w is not None else [])
            grads = torch.autograd.grad(z, inputs, grad_outputs=dz.to(z.dtype), allow_unused=True)
            del z, dz
            grad_h[sl] = grads[0]
            if grad_w is not None and grads[1] is not None:
                grad_w += grads[1]
            total += loss
        ctx.save_for_backward(grad_h, *([grad_w] if grad_w is not None else []))
        ctx.has_w = grad_w is not None
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        gh = saved[0] * grad_out.to(saved[0].dtype)
        gw = saved[1] * grad_out.to(saved[1].dtype) if ctx.has_w else None
        return gh, gw, None, None, None


def chunked_head_loss(model, h: Tensor, chunk_fn: ChunkFn, chunk: int = 1024) -> Tensor:
    """Sum of `chunk_fn` over chunks of the flattened hidden states h [N, d] passed through model.logits.

    The head's only parameter is the tied embedding (`model.model.embed_tokens.weight`); its gradient
    and h's are accumulated chunk by chunk (see the module docstring).
    """
    weight = model.model.embed_tokens.weight
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedHeadLoss.apply(h, weight, model.logits, chunk_fn, chunk)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.no_grad():
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            total += chunk_fn(model.logits(h[sl]).float(), sl, False)[0]
    return total


def _count(targets: Tensor) -> Tensor:
    return (targets != IGNORE).sum().clamp(min=1)


def _ce_chunk(z: Tensor, t: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Summed CE of logits z [n, V] against targets t [n]; d/dz = softmax(z) - onehot(t), 0 on ignored rows."""
    valid = t != IGNORE
    tt = t.clamp(min=0)[:, None]
    lse = torch.logsumexp(z, dim=-1)
    loss = ((lse - z.gather(1, tt)[:, 0]) * valid).sum()
    if not want_grad:
        return loss, None
    dz = torch.exp(z - lse[:, None])
    dz.scatter_add_(1, tt, torch.full_like(tt, -1, dtype=dz.dtype))
    return loss, dz.mul_(valid[:, None])


def cross_entropy(model, h: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Mean next-token cross-entropy. h [..., d] final hidden states, targets [...] (IGNORE = skip)."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        return _ce_chunk(z, targets[sl], want_grad)

    return chunked_head_loss(model, h, fn, chunk) / _count(targets)


def _mixed(kd: Tensor, dkd: Tensor | None, z: Tensor, t: Tensor, alpha: float,
           want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(1 - alpha) * KD + alpha * CE for one chunk (sums over its valid tokens), and its logit gradient."""
    if alpha == 0.0:
        return kd, dkd
    ce, dce = _ce_chunk(z, t, want_grad)
    loss = (1.0 - alpha) * kd + alpha * ce
    return loss, (dkd.mul_(1.0 - alpha).add_(dce, alpha=alpha) if want_grad else None)


def distill_full(model, h: Tensor, teacher, teacher_h: Tensor, targets: Tensor, temperature: float = 1.0,
                 alpha: float = 0.0, chunk: int = 1024) -> Tensor:
    """Gemma 2 distillation: mean over tokens of sum_x -P_T(x|c) log P_S(x|c), optionally mixed with CE.

    A teacher vocabulary larger than the student's is truncated to the student's ids (P_T renormalized
    over them). Both distributions are taken at `temperature` T (softmax(z / T)) and the KD term is multiplied by
    T^2 so its gradient keeps the same scale as T changes (Hinton et al., 2015); at T = 1 it is exactly
    the Gemma 2 objective. loss = (1 - alpha) * T^2 * KD + alpha * CE(targets).
    The teacher's logits come from `teacher.logits(teacher_h[chunk])` under no_grad, chunk by chunk,
    so neither model's full [tokens x vocab] logits exist at once. Targets equal to IGNORE are skipped.
    Gradient w.r.t. the student logits: T * (softmax(z / T) - P_T) per valid token (P_T sums to 1).
    """
    h, teacher_h, targets = h.reshape(-1, h.shape[-1]), teacher_h.reshape(-1, teacher_h.shape[-1]), targets.reshape(-1)
    V = model.config.vocab_size
    if teacher.config.vocab_size < V:
        raise ValueError(f"teacher vocabulary ({teacher.config.vocab_size}) is smaller than the student's ({V}): "
                         f"distillation needs a shared tokenizer (the student's ids must be teacher ids)")
    valid = (targets != IGNORE).float()
    T = temperature

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():  # softmax in place: one [chunk x vocab] teacher array, not two
            # A teacher with more rows (Gemma 3 4B+: 262,208 vs 262,144): its distribution over the
            # student's ids, renormalized, is the softmax of its logits truncated to them.
            zt = teacher.logits(teacher_h[sl]).float()[:, :V]
            zt = zt / T if T != 1.0 else zt
            p_t = zt.sub_(torch.logsumexp(zt, dim=-1, keepdim=True)).exp_()
        logq = torch.log_softmax(z / T, dim=-1)
        kd = (-(p_t * logq).sum(-1) * valid[sl]).sum() * T * T
        dkd = logq.exp_().sub_(p_t).mul_(valid[sl, None] * T) if want_grad else None
        return _mixed(kd, dkd, z, targets[sl], alpha, want_grad)

    return chunked_head_loss(model, h, fn, chunk) / _count(targets)


def sample_teacher(logits: Tensor, k: int, generator: torch.Generator | None = None,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """k token ids per position sampled from softmax(logits / T) WITHOUT replacement, and P_T at them.

    Returns (ids [..., k] int64, probs [..., k] fp32, the unnormalized teacher probabilities).

    Sampling uses the Gumbel-top-k trick: the k largest of log p + Gumbel noise are an exact sample
    without replacement, drawn in proportion to the teacher's probabilities (the first pick is a draw
    from p, the next a draw from p restricted to what is left, and so on). Unlike torch.multinomial
    it needs no k non-zero probabilities: when the teacher's support is smaller than k, the leftover
    slots hold ids of probability 0, which contribute nothing to the loss.

    Why without replacement (the duplicate rule): Gemma 3 sets the teacher target to zero outside the
    sampled set and renormalizes it inside. With distinct ids that target is exactly
    P_T(x) / sum_{y in S} P_T(y), and once S covers the support it IS the teacher distribution, so the
    loss equals full distillation (tested). Sampling with replacement and using counts would instead
    give an unbiased but noisier Monte-Carlo target that never equals P_T, and would spend slots on
    repeats of the top tokens (a confident teacher would fill most of the 256 draws with one id).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    # Gumbel noise as -log(E), E ~ Exp(1): one log per entry instead of two for -log(-log(U)).
    e = torch.empty_like(logp).exponential_(generator=generator)
    ids = torch.topk(logp - e.clamp_(min=1e-30).log_(), k, dim=-1).indices  # E = 0 would force an id in
    return ids, logp.gather(-1, ids).exp()


def distill_sampled(model, h: Tensor, ids: Tensor, probs: Tensor, targets: Tensor, alpha: float = 0.0,
                    chunk: int = 1024) -> Tensor:
    """Gemma 3 sampled-logit distillation: mean over tokens of -sum_{x in S} Q_T(x) log P_S(x|c).

    ids [..., k] are the sampled teacher ids (distinct, see `sample_teacher`), probs [..., k] the
    teacher's probabilities at them (any positive scale, e.g. fp16 from the teacher cache); the target
    Q_T is probs renormalized over the sample (zero outside it). log P_S is the student's FULL-vocabulary
    log-softmax gathered at the sampled ids, so the student's normalizer still runs over every token.
    Sampled ids at or past the student's vocabulary (a teacher with more rows) get Q_T = 0: the target
    is the teacher renormalized over the sample's student ids.
    Optionally mixed with CE: (1 - alpha) * KD + alpha * CE.
    """
    k = ids.shape[-1]
    h, ids, probs, targets = h.reshape(-1, h.shape[-1]), ids.reshape(-1, k), probs.reshape(-1, k), targets.reshape(-1)
    valid = (targets != IGNORE).float()
    V = model.config.vocab_size

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        idx = ids[sl].long()
        outside = idx >= V
        q = probs[sl].float().masked_fill(outside, 0.0)
        q = q / q.sum(-1, keepdim=True).clamp(min=1e-30) * valid[sl, None]
        idx = idx.masked_fill(outside, 0)  # any student id: its weight is 0
        logp_all = torch.log_softmax(z, dim=-1)
        logp = logp_all.gather(-1, idx)
        # 0 * log p for zero-probability slots (padding past the teacher's support) must stay 0.
        kd = -(torch.where(q > 0, q * logp, 0.0)).sum()
        dkd = None
        if want_grad:  # d/dz = softmax(z) * sum(Q) - Q scattered to its ids (sum(Q) = 1 on valid rows)
            dkd = logp_all.exp_().mul_(q.sum(-1, keepdim=True)).scatter_add_(1, idx, -q)
        return _mixed(kd, dkd, z, targets[sl], alpha, want_grad)

    return chunked_head_loss(model, h, fn, chunk) / _count(targets)
