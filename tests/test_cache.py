import pytest
import torch

from gemmakit.cache import cache_bytes, make_cache
from gemmakit.config import GLOBAL, LOCAL, get_config
from gemmakit.model import build

W = 5  # window of the tiny models


def tiny(name="gemma3-270m"):
    cfg = get_config(name)
    cfg = cfg.replace(name=f"tiny-{name}", vocab_size=101, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                      intermediate_size=64, n_layers=6, layer_types=cfg.layer_types[:6], max_seq_len=48,
                      sliding_window=W if cfg.sliding_window else None)
    model = build(cfg, "cpu")
    g = torch.Generator().manual_seed(0)
    model.init_weights(std=0.3, generator=g)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0, 0.3, generator=g)
    return model.eval()


TOKENS = torch.randint(0, 101, (2, 3 * W + 4), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma2-2b", "gemma3-270m"])
@pytest.mark.parametrize("prefill", [2, W + 3])  # shorter and longer than the window
def test_prefill_then_decode_past_3_windows_equals_full_forward(name, prefill):
    model = tiny(name)
    full = model(TOKENS)
    cache = make_cache(model.config, 2, TOKENS.shape[1])
    # Local layers really are rings of W slots; global layers hold the whole sequence.
    assert [c.size for c in cache] == [W if k == LOCAL else TOKENS.shape[1] for k in model.config.layer_types]
    assert any(c.ring for c in cache)
    outs = [model(TOKENS[:, :prefill], cache=cache)]  # one pass, even when longer than the window
    for i in range(prefill, TOKENS.shape[1]):
        outs.append(model(TOKENS[:, i:i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_chunked_prefill_onto_a_wrapped_ring():
    model = tiny()
    full = model(TOKENS)
    cache = make_cache(model.config, 2, TOKENS.shape[1])
    cuts = [0, W + 1, W + 3, 2 * W + 4, TOKENS.shape[1]]  # chunks of W+1, 2, W+1, rest
    outs = [model(TOKENS[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_ring_keeps_exactly_the_last_window_positions():
    model = tiny()
    cache = make_cache(model.config, 2, TOKENS.shape[1])
    n = 2 * W + 2
    model(TOKENS[:, :W + 1], cache=cache)
    for i in range(W + 1, n):
        model(TOKENS[:, i:i + 1], cache=cache)
    ring = next(c for c in cache if c.ring)
    assert sorted(ring.pos[0].tolist()) == list(range(n - W, n))
    assert ring.k.shape[2] == W


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone():
    model = tiny()
    a, b = TOKENS[0, :3 * W].tolist(), TOKENS[1, :4].tolist()
    pad = len(a) - len(b)
    tokens = torch.tensor([a, [0] * pad + b])
    positions = torch.tensor([list(range(len(a))), [-1] * pad + list(range(len(b)))])
    cache = make_cache(model.config, 2, len(a) + 3)
    model(tokens, positions, cache)
    nxt = torch.tensor([[7], [9]])
    got = model(nxt, torch.tensor([[len(a)], [len(b)]]), cache)[:, -1]
    torch.testing.assert_close(got[0], model(torch.tensor([a + [7]]))[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], model(torch.tensor([b + [9]]))[0, -1], rtol=1e-5, atol=1e-5)


def test_past_the_context_length_is_an_error_stating_the_limit():
    model = tiny()
    with pytest.raises(ValueError, match="context of 48"):
        make_cache(model.config, 1, 49)
    cache = make_cache(model.config, 1, 6)
    with torch.no_grad():
        model(TOKENS[:1, :6], cache=cache)
        with pytest.raises(ValueError, match="holds 6 tokens"):
            model(TOKENS[:1, 6:7], cache=cache)
        with pytest.raises(ValueError, match="holds 6 tokens"):
            model(TOKENS[:1, 6:8], cache=cache)


def test_cache_bytes_matches_what_make_cache_allocates():
    model = tiny()
    for n in (3, W, 40):
        cache = make_cache(model.config, 3, n, dtype=torch.bfloat16)
        assert cache_bytes(model.config, 3, n, 2) == sum(c.nbytes() for c in cache)
    cfg = get_config("gemma3-27b")
    # 62 layers, 10 global (every 6th): 10 * 32768 + 52 * 1024 slots of 2 * 16 heads * 128 * 2 bytes.
    assert cache_bytes(cfg, 1, 32768) == (10 * 32768 + 52 * 1024) * 2 * 16 * 128 * 2
    assert cache_bytes(cfg, 1, 32768, global_only=True) == 62 * 32768 * 2 * 16 * 128 * 2
    assert cfg.layer_types.count(GLOBAL) == 10


@torch.no_grad()
def test_a_row_at_position_minus_1_writes_nothing_and_rows_advance_on_their_own():
    # The scheduler decodes all its slots in one step; a slot that is free or still prefilling takes
    # position -1 and must keep its cache, and the others continue at their own positions. (Main wrote
    # every row at one shared step, so the idle row's ring lost a key it needed.)
    model = tiny()
    a, b = TOKENS[0, :8], TOKENS[1, :8]
    cache = make_cache(model.config, 2, 20)
    model(torch.stack([a[:6], b[:6]]), cache=cache)  # 6 tokens: the rings of 5 have wrapped
    before = [(c.k[1].clone(), c.v[1].clone(), c.pos[1].clone()) for c in cache]
    model(torch.tensor([[int(a[6])], [0]]), torch.tensor([[6], [-1]]), cache)  # row 1 idles
    for c, (k, v, pos) in zip(cache, before):
        assert torch.equal(c.k[1], k) and torch.equal(c.v[1], v) and torch.equal(c.pos[1], pos)
    out = model(torch.tensor([[int(a[7])], [int(b[6])]]), torch.tensor([[7], [6]]), cache)[:, -1]
    torch.testing.assert_close(out[0], model(a[None, :8])[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], model(b[None, :7])[0, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rows_views_prefill_one_row_and_truncate_forgets():
    model = tiny()
    a, b = TOKENS[0, :12], TOKENS[1, :3]
    cache = make_cache(model.config, 2, 20)
    model(a[None, :11], cache=[c.rows(0, 1) for c in cache])  # each row prefilled on its own, in place
    model(b[None, :2], cache=[c.rows(1, 2) for c in cache])
    out = model(torch.tensor([[int(a[11])], [int(b[2])]]), torch.tensor([[11], [2]]), cache)[:, -1]
    torch.testing.assert_close(out[0], model(a[None])[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], model(b[None])[0, -1], rtol=1e-5, atol=1e-5)
    # Truncated to 2 tokens, row 1 continues from its third as if fresh (a global layer keeps positions 0-1).
    for c in cache:
        c.truncate(1, 2)
        assert sorted(p for p in c.pos[1].tolist() if p >= 0) == [0, 1]
    again = model(torch.tensor([[int(a[11])], [int(b[2])]]), torch.tensor([[-1], [2]]), cache)[1, -1]
    torch.testing.assert_close(again, out[1], rtol=1e-5, atol=1e-5)


def test_holds_says_whether_a_truncated_row_still_has_the_window():
    ring, static = make_cache(tiny().config, 1, 20)[:6:5]  # layer 0 local (a ring of 5), layer 5 global
    assert ring.ring and not static.ring
    assert static.holds(12, 3) and static.holds(12, 12) and not static.holds(12, 13)
    assert ring.holds(12, 12) and ring.holds(12, 11)  # continuing at the end (or one before) of what was fed
    assert not ring.holds(12, 10)  # position 10 needs 6..9, but the ring holds 7..11
    assert ring.holds(12, 0) and ring.holds(4, 2)  # nothing needed, or nothing overwritten yet
