import math

import pytest
import torch

from gemmakit import sample as S


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.5]])
    assert S.greedy(logits).tolist() == [1, 0]
    assert S.sample(logits, temperature=0.0, top_k=1).tolist() == [1, 0]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    out = S.top_k(logits, 2)
    assert torch.isinf(out).tolist() == [[True, False, True, False]]
    assert out[0, 1] == 4.0 and out[0, 3] == 3.0
    with pytest.raises(ValueError, match="top_k"):
        S.top_k(logits, 0)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert (~torch.isinf(S.top_p(logits, 0.5))).tolist() == [[True, False, False, False]]
    assert (~torch.isinf(S.top_p(logits, 0.79))).tolist() == [[True, True, False, False]]
    assert (~torch.isinf(S.top_p(logits, 0.81))).tolist() == [[True, True, True, False]]
    assert (~torch.isinf(S.top_p(logits, 1.0))).all()
    # Unsorted input: the mask follows the ids, not the sorted order.
    shuffled = logits[:, [2, 0, 3, 1]]
    assert (~torch.isinf(S.top_p(shuffled, 0.79))).tolist() == [[False, True, False, True]]


def test_min_p_relative_to_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = S.min_p(probs.log(), 0.3)  # keep p >= 0.15
    assert (~torch.isinf(out)).tolist() == [[True, True, True, False]]
    assert not math.isinf(S.min_p(probs.log(), 0.0)[0, 3])


def test_seeded_sampling_repeats_and_seeds_differ():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [S.sample(logits, temperature=1.0, generator=g).tolist() for _ in range(5)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_respects_filters_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    ids = S.sample(logits, temperature=1.0, top_k=2, generator=g)
    assert set(ids.tolist()) == {0, 1}
    # Empirical frequency of id 0 under top-k 2 at T=1: e^2 / (e^2 + e^1) = 0.731.
    assert abs((ids == 0).float().mean().item() - 0.731) < 0.04
    cold = S.sample(logits, temperature=0.05, generator=g)
    assert (cold == 0).all()
    with pytest.raises(ValueError, match="temperature"):
        S.sample(logits, temperature=-1.0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids():
    # CTRL (Keskar et al. 2019) as transformers' RepetitionPenaltyLogitsProcessor applies it.
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0], [2.0, -1.0, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, True, True]])
    out = S.repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, -4.0], [2.0, -1.0, 1.5, -8.0]]
    assert torch.equal(S.repetition_penalty(logits, seen, 1.0), logits)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        S.repetition_penalty(logits, seen, 0.0)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1, got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\], got 2.0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
])
def test_check_sampling_names_the_bad_setting(kw, message):
    with pytest.raises(ValueError, match=message):
        S.check_sampling(**kw)
    S.check_sampling(temperature=0.7, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=1.0)  # edges are fine
