"""Model numerics that parity with a tiny random model cannot pin down: masks against written-out
0/1 matrices, fp32 RMSNorm, the bf16 embedding normalizer, dtypes, the final soft-cap."""

import math

import pytest
import torch

from conftest import random_model, tiny_config
from gemmakit.config import GLOBAL
from gemmakit.model import RMSNorm, attention_mask, build


def mask(q_pos, k_pos=None, window=None, segments=None):
    q = torch.tensor([q_pos])
    k = q if k_pos is None else torch.tensor([k_pos])
    s = None if segments is None else torch.tensor([segments])
    m = attention_mask(q, k, window, s, s)
    assert m.dtype == torch.bool and m.shape == (1, 1, q.shape[1], k.shape[1])
    return m[0, 0].int().tolist()


def test_causal_mask():
    assert mask([0, 1, 2, 3, 4]) == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]


def test_sliding_window_mask():
    # W = 3: key k visible from query q iff q - 3 < k <= q, i.e. the token itself and the two before it.
    assert mask([0, 1, 2, 3, 4, 5], window=3) == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]


def test_window_over_cached_keys():
    # Decoding position 6 against a ring buffer of 3 slots plus itself; slot order is not position order.
    assert mask([6], k_pos=[3, 4, 5, 6], window=3) == [[0, 1, 1, 1]]
    assert mask([6], k_pos=[6, 4, 5, 3], window=3) == [[1, 1, 1, 0]]
    assert mask([2], k_pos=[0, 1, -1, 2], window=3) == [[1, 1, 0, 1]]  # -1: an empty slot


def test_left_padding_mask():
    # Two pad tokens (position -1) before a 3-token prompt. Nobody attends to padding; padding queries
    # see every key so their softmax stays finite (their outputs are never used).
    assert mask([-1, -1, 0, 1, 2]) == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_segment_mask():
    # Two packed documents, positions restarting at the second one.
    assert mask([0, 1, 2, 0, 1], segments=[0, 0, 0, 1, 1]) == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_padded_row_matches_unpadded_row():
    model = random_model(tiny_config(3))
    tokens = torch.tensor([[0, 0, 0, 5, 9, 17, 3, 99, 42], [7, 1, 64, 12, 2, 8, 120, 33, 45]])
    positions = torch.tensor([[-1, -1, -1, 0, 1, 2, 3, 4, 5], list(range(9))])
    with torch.no_grad():
        padded = model(tokens, positions)
        alone = model(tokens[:1, 3:])
    torch.testing.assert_close(padded[0, 3:], alone[0], rtol=1e-5, atol=1e-5)


# -- RMSNorm -----------------------------------------------------------------------------------

def test_rmsnorm_formula_and_zero_centred_weight():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8)
    unit = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), unit)  # w = 0 means scale 1
    with torch.no_grad():
        norm.weight.fill_(1.0)
    torch.testing.assert_close(norm(x), 2 * unit)


def test_rmsnorm_computes_in_fp32_and_casts_once():
    torch.manual_seed(0)
    norm = RMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(0, 1)
    x = (torch.randn(4, 64) * 30).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    xf, wf = x.float(), norm.weight.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + wf)).bfloat16()
    assert torch.equal(out, ref)
    # The same formula evaluated in bf16 rounds differently: the fp32 path is what the test pins.
    xb = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert not torch.equal(out, xb * (1 + norm.weight))


def test_rmsnorm_survives_values_whose_squares_overflow_fp16():
    norm = RMSNorm(4)
    x = torch.tensor([[300.0, -300.0, 300.0, -300.0]], dtype=torch.float16)  # 300^2 > 65504
    assert torch.isinf(x.pow(2)).all()
    assert torch.equal(norm(x), torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float16))


# -- embedding, dtypes, soft-cap ---------------------------------------------------------------

def one_layer(d_model, **kw):
    return tiny_config(1).replace(d_model=d_model, n_layers=1, layer_types=(GLOBAL,), vocab_size=4, **kw)


def test_embedding_normalizer_is_rounded_to_the_compute_dtype():
    for dtype, factor in [(torch.bfloat16, 55.5), (torch.float32, float(torch.tensor(math.sqrt(3072))))]:
        model = build(one_layer(3072), "cpu", dtype)
        with torch.no_grad():
            model.model.embed_tokens.weight.fill_(1.0)
        x = model.embed(torch.tensor([[0, 3]]))
        assert x.dtype == dtype
        assert torch.all(x == factor), (dtype, x.unique())
    assert factor != 55.5 and abs(factor - 55.4256) < 1e-4


def test_float16_is_refused():
    with pytest.raises(ValueError, match="overflow"):
        build(tiny_config(2), "meta", torch.float16)


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_bf16_forward_is_close_to_fp32(generation):
    model = random_model(tiny_config(generation), std=0.1)
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
        out = model.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 keeps 8 bits of mantissa: a few percent of the logit scale, and the same top choice almost always.
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_final_softcap_bounds_logits_by_30():
    capped = random_model(tiny_config(2), std=2.0)  # large weights: raw logits far beyond 30
    raw = build(tiny_config(2).replace(final_softcap=None), "cpu")
    raw.load_state_dict(capped.state_dict())
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, unbounded = capped(tokens), raw(tokens)
    assert unbounded.abs().max() > 100
    assert out.abs().max() <= 30 and out.abs().max() > 29
    torch.testing.assert_close(out, 30 * torch.tanh(unbounded / 30))
