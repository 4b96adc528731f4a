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

All losses return the MEAN over the tokens whose target is not `IGNORE` (-100), and run the LM head
only on those tokens: the rows of the others are dropped before the head (`_kept`), so they cost
nothing and cannot influence the loss (in chat SFT, the prompts' tokens are about half of a sequence,
and the head with its 262,144 rows was over half of a training step of the 270M).
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
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            with torch.enable_grad():
                hc = h[sl].detach().requires_grad_(True)
                z = head(hc)
            loss, dz = chunk_fn(z.detach().float(), sl, True)
            inputs = [hc] + ([weight] if weight.requires_grad else [])
            grads = torch.autograd.grad(z, inputs, grad_outputs=dz.to(z.dtype), allow_unused=True)
            del z, dz
            grad_h[sl] = grads[0]
            if weight.requires_grad and grads[1] is not None:
                # The first chunk's weight gradient is kept as it comes: adding it to a zero-filled
                # [vocab, d] buffer would cost two passes over it (0.7 s at one thread for the 270M).
                grad_w = grads[1] if grad_w is None else grad_w.add_(grads[1])
            total += loss
        ctx.save_for_backward(grad_h, grad_w)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError("a chunked head loss scales its stored gradients in place: one backward only "
                               "(retain_graph is not supported)")
        ctx.used = True
        gh, gw = ctx.saved_tensors
        # In place: these buffers are this function's own and used once; a scaled copy of a trainable
        # head's [vocab, d] gradient cost 0.9 s per step at one thread for the 270M.
        gh = gh.mul_(grad_out.to(gh.dtype))
        gw = gw.mul_(grad_out.to(gw.dtype)) if gw is not None else None
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


def _kept(targets: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """(targets, *rows) restricted to the rows whose target is not IGNORE (all flattened to [N, ...])."""
    targets = targets.reshape(-1)
    rows = tuple(r.reshape(targets.shape[0], -1) for r in rows)  # [..., X] per target -> [N, X]
    keep = targets != IGNORE
    if bool(keep.all()):  # plain text: nothing to drop, no copy
        return (targets, *rows)
    idx = keep.nonzero()[:, 0]
    return (targets[idx], *(r[idx] for r in rows))


def _ce_chunk(z: Tensor, t: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Summed CE of logits z [n, V] against targets t [n]; d/dz = softmax(z) - onehot(t), 0 on ignored rows.

    One [n, V] temporary besides z: the softmax numerators exp(z - max), which become the gradient in
    place (logsumexp, then exp(z - lse), then the subtraction each allocated another)."""
    valid = t != IGNORE
    tt = t.clamp(min=0)[:, None]
    picked = z.gather(1, tt)[:, 0]
    top = z.amax(-1, keepdim=True)
    e = (z - top).exp_()
    total = e.sum(-1, keepdim=True)
    lse = (top + total.log())[:, 0]
    loss = ((lse - picked) * valid).sum()
    if not want_grad:
        return loss, None
    dz = e.div_(total)
    dz.scatter_add_(1, tt, torch.full_like(tt, -1, dtype=dz.dtype))
    return loss, dz.mul_(valid[:, None])


def cross_entropy(model, h: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Mean next-token cross-entropy. h [..., d] final hidden states, targets [...] (IGNORE = skip)."""
    n = _count(targets)
    targets, h = _kept(targets, h)

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        return _ce_chunk(z, targets[sl], want_grad)

    return chunked_head_loss(model, h, fn, chunk) / n


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
    V = _check_teacher(model, teacher)
    n = _count(targets)
    targets, h, teacher_h = _kept(targets, h, teacher_h)
    T = temperature

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():  # softmax in place: one [chunk x vocab] teacher array, not two
            p_t = _teacher_logp(teacher, teacher_h[sl], V, T).exp_()
        logq = _student_logp(z, T)
        kd = -(p_t * logq).sum() * T * T
        dkd = logq.exp_().sub_(p_t).mul_(T) if want_grad else None
        return _mixed(kd, dkd, z, targets[sl], alpha, want_grad)

    return chunked_head_loss(model, h, fn, chunk) / n


def _check_teacher(model, teacher) -> int:
    """The student's vocabulary size; ValueError if the teacher has fewer rows."""
    V = model.config.vocab_size
    if teacher.config.vocab_size < V:
        raise ValueError(f"teacher vocabulary ({teacher.config.vocab_size}) is smaller than the student's ({V}): "
                         f"distillation needs a shared tokenizer (the student's ids must be teacher ids)")
    return V


def _teacher_logp(teacher, teacher_h: Tensor, V: int, T: float) -> Tensor:
    """log softmax(teacher logits / T) [n, V] fp32, over the student's V ids. A teacher with more rows
    (Gemma 3 4B+: 262,208 vs 262,144): its distribution over the student's ids, renormalized, is the
    softmax of its logits truncated to them."""
    zt = teacher.logits(teacher_h).float()[:, :V]
    zt = zt / T if T != 1.0 else zt
    return zt.sub_(torch.logsumexp(zt, dim=-1, keepdim=True))


def _student_logp(z: Tensor, T: float) -> Tensor:
    """log softmax(z / T) by the same operations as `_teacher_logp`: equal logits give bit-equal log-probs,
    so a student equal to its teacher gets exactly zero gradient (log_softmax's own kernel rounds
    differently, and AdamW turns a 1e-9 gradient into a full lr-sized step)."""
    z = z / T if T != 1.0 else z
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def distill_jsd(model, h: Tensor, teacher, teacher_h: Tensor, targets: Tensor, beta: float = 0.0,
                temperature: float = 1.0, alpha: float = 0.0, chunk: int = 1024) -> Tensor:
    """GKD's generalized Jensen-Shannon divergence (Agarwal et al., 2024, "On-policy distillation of
    language models"), per token, between the teacher's distribution P_T and the student's P_S:

        beta = 0:      KL(P_T || P_S)  forward KL, mode-covering: the Gemma 2/3 objective (distill_full's
                       cross-entropy minus the teacher's entropy: the same gradient, and 0 at P_S = P_T)
        0 < beta < 1:  beta KL(P_T || M) + (1 - beta) KL(P_S || M),  M = beta P_T + (1 - beta) P_S
        beta = 1:      KL(P_S || P_T)  reverse KL, mode-seeking

    (TRL's GKDTrainer convention: the ends are the limits of JSD(beta) / beta and / (1 - beta), since
    JSD(0) = JSD(1) = 0.) Every value is >= 0 and 0 exactly when P_S = P_T, where the gradient is 0 too.
    Temperature T and the T^2 factor as in `distill_full`; mixed with CE as (1 - alpha) KD + alpha CE.
    h, teacher_h [..., d]; targets [...] (IGNORE = skipped: neither model's head runs there). Returns the
    mean over the kept tokens. Gradient w.r.t. u = z / T, with g = dKD/dP_S:
    P_S * (g - <P_S, g>); g = (1 - beta)(log P_S - log M) inside, log P_S - log P_T + 1 at beta = 1,
    and P_S - P_T directly at beta = 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    V = _check_teacher(model, teacher)
    n = _count(targets)
    targets, h, teacher_h = _kept(targets, h, teacher_h)
    T = temperature

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            logp_t = _teacher_logp(teacher, teacher_h[sl], V, T)
        logp_s = _student_logp(z, T)
        p_s = logp_s.exp()
        if beta == 0.0:
            p_t = logp_t.exp()
            kd = (p_t * (logp_t - logp_s)).sum()
            du = p_s.sub_(p_t) if want_grad else None
        elif beta == 1.0:
            diff = logp_s.sub_(logp_t)  # log P_S - log P_T, in place
            kl = (p_s * diff).sum(-1, keepdim=True)
            kd = kl.sum()
            du = diff.sub_(kl).mul_(p_s) if want_grad else None
        else:
            # log M - log P_S = f(d), d = log P_T - log P_S, written so that d = 0 gives exactly 0 (and no
            # overflow either way): log1p(beta expm1(d)) for d <= 0, d + log(beta + (1 - beta) e^-d) above.
            d = logp_t - logp_s
            f = torch.where(d > 0, d + torch.log(beta + (1 - beta) * torch.exp(-d)), torch.log1p(beta * torch.expm1(d)))
            kd = beta * (logp_t.exp() * (d - f)).sum() - (1 - beta) * (p_s * f).sum()
            du = None
            if want_grad:
                g = f.mul_(beta - 1)  # dJSD/dP_S = (1 - beta)(log P_S - log M)
                du = g.sub_((p_s * g).sum(-1, keepdim=True)).mul_(p_s)
        dz = du.mul_(T) if want_grad else None  # d/dz = (d/du) / T, times the T^2 of the loss
        return _mixed(kd * T * T, dz, z, targets[sl], alpha, want_grad)

    return chunked_head_loss(model, h, fn, chunk) / n


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
                    chunk: int = 1024, kl: bool = False) -> Tensor:
    """Gemma 3 sampled-logit distillation: mean over tokens of -sum_{x in S} Q_T(x) log P_S(x|c).

    ids [..., k] are the sampled teacher ids (distinct, see `sample_teacher`), probs [..., k] the
    teacher's probabilities at them (any positive scale, e.g. fp16 from the teacher cache); the target
    Q_T is probs renormalized over the sample (zero outside it). log P_S is the student's FULL-vocabulary
    log-softmax gathered at the sampled ids, so the student's normalizer still runs over every token.
    Sampled ids at or past the student's vocabulary (a teacher with more rows) get Q_T = 0: the target
    is the teacher renormalized over the sample's student ids.
    Optionally mixed with CE: (1 - alpha) * KD + alpha * CE.
    `kl`: report KL(Q_T || P_S) = sum_S Q_T (log Q_T - log P_S) instead (the same gradient; >= 0, and 0
    when the student's distribution equals the target: a sample covering the teacher's support and a
    student equal to the teacher).
    """
    V = model.config.vocab_size
    n = _count(targets)
    targets, h, ids, probs = _kept(targets, h, ids, probs)

    def fn(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        idx = ids[sl].long()
        outside = idx >= V
        q = probs[sl].float().masked_fill(outside, 0.0)
        q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
        idx = idx.masked_fill(outside, 0)  # any student id: its weight is 0
        logp_all = torch.log_softmax(z, dim=-1)
        logp = logp_all.gather(-1, idx)
        # 0 * log p for zero-probability slots (padding past the teacher's support) must stay 0.
        kd = -(torch.where(q > 0, q * (logp - q.log() if kl else logp), 0.0)).sum()
        dkd = None
        if want_grad:  # d/dz = softmax(z) * sum(Q) - Q scattered to its ids (sum(Q) = 1 on every row)
            dkd = logp_all.exp_().mul_(q.sum(-1, keepdim=True)).scatter_add_(1, idx, -q)
        return _mixed(kd, dkd, z, targets[sl], alpha, want_grad)

    return chunked_head_loss(model, h, fn, chunk) / n
