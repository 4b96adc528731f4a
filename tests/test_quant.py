import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gemmakit import quant
from gemmakit.config import get_config
from gemmakit.model import build
from gemmakit.quant import Int4Linear, Int8Linear, QuantEmbedding, quantize, quantize_int4, quantize_int8, weight_bytes


def tiny(vocab_size: int = 256):
    cfg = get_config("gemma3-270m").replace(name="tiny", vocab_size=vocab_size, d_model=64, n_heads=2, n_kv_heads=1,
                                            head_dim=32, intermediate_size=128, n_layers=6,
                                            layer_types=get_config("gemma3-270m").layer_types[:6],
                                            max_seq_len=64, sliding_window=8)
    model = build(cfg, "cpu")
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    return model.eval()


def test_int8_roundtrip_error_is_within_half_a_step():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (48, 64) and scale.shape == (48,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(1) == 127).all()  # every row uses its full range


def test_int4_roundtrip_error_and_packing():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    packed, scale, low = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 2, 16) and scale.shape == low.shape == (8, 2)
    m = Int4Linear(64, 8, torch.float32)
    m.load_state_dict({"weight": packed, "scale": scale, "low": low})  # GGUF's block order in the state dict
    assert torch.equal(m.weight, packed)
    err = (m.dequantize() - w).abs().reshape(8, 2, 32)
    assert (err <= scale[..., None] / 2 + 1e-5).all()
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4(torch.randn(4, 40), 32)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantizing_in_row_blocks_equals_the_whole_matrix(cls, monkeypatch):
    lin = nn.Linear(64, 24, bias=False)
    whole = cls.from_linear(lin)
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 64 * 5)  # 5 rows at a time: blocks of 5, 5, 5, 5, 4
    blocked = cls.from_linear(lin)
    for name, t in whole.state_dict().items():
        torch.testing.assert_close(blocked.state_dict()[name], t, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_linear_paths_agree_with_dequantized_weight(cls, rows, monkeypatch):
    lin = nn.Linear(64, 24, bias=False)
    m = cls.from_linear(lin)
    x = torch.randn(rows, 64)
    want = x @ m.dequantize().T
    torch.testing.assert_close(m.fused(x), want, rtol=1e-5, atol=1e-5)  # the compiled decode path
    y = m(x)
    assert y.shape == (rows, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 64 * 5)  # dequantized 5 rows at a time
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    y3 = m(x.view(1, rows, 64))  # [B, T, in]
    torch.testing.assert_close(y3, want[None], rtol=1e-5, atol=1e-5)
    assert y3.is_contiguous()  # logits of many positions: a strided result would slow everything after
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < (0.01 if cls is Int8Linear else 0.1)


@pytest.mark.parametrize("mode, tol", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_model_close_to_fp32_with_strict_shapes(mode, tol):
    model = tiny()
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        quantize(model, mode)
        out = model(tokens)  # prefill path (40 rows)
        one = model(tokens[:1, :1])  # decode path (1 row) through embedding, layers and head
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert not any(p.is_floating_point() and p.dim() == 2 for p in model.parameters())  # no float matrices left
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol
    torch.testing.assert_close(one[0, 0], out[0, 0], rtol=1e-4, atol=1e-4)
    # Exactly the plain model with the dequantized weights: the error is only the rounding of weights.
    plain = tiny()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (Int8Linear, Int4Linear)):
                target = name.removesuffix(".table") + ".weight"
                plain.get_parameter(target).copy_(m.dequantize())
        torch.testing.assert_close(out, plain(tokens), rtol=1e-4, atol=1e-4)
    st = {k: v.dtype for k, v in model.state_dict().items()}
    want = torch.int8 if mode == "int8" else torch.uint8
    assert st["model.layers.0.self_attn.q_proj.weight"] == want
    assert st["model.embed_tokens.table.weight"] == want


def test_bf16_model_stays_bf16_and_bytes_match_the_plan():
    model = tiny().to(torch.bfloat16)
    quantize(model, "int8")
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert model(tokens).dtype == torch.bfloat16
    stored = sum(t.nbytes for t in model.state_dict().values())
    assert stored == weight_bytes(model.config, "int8", dtype_bytes=2)
    m4 = tiny().to(torch.bfloat16)
    quantize(m4, "int4")
    assert sum(t.nbytes for t in m4.state_dict().values()) == weight_bytes(m4.config, "int4", dtype_bytes=2)
    assert sum(t.nbytes for t in tiny().state_dict().values()) == weight_bytes(m4.config, None, dtype_bytes=4)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="int8, int4"):
        quantize(tiny(), "int3")


def test_every_command_offers_every_format():
    """cli.py spells the formats out (it does not import torch, which quant.py needs): the same list."""
    from gemmakit import cli

    for command in ("generate", "chat", "perplexity", "serve"):
        sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
        [action] = [a for a in sub._actions if a.dest == "quantize"]
        assert tuple(action.choices) == quant.MODES, command


@pytest.mark.parametrize("dtype, tile", [(torch.bfloat16, 32), (torch.float32, 1)])
def test_fuse_decode_keeps_the_checkpoint_and_the_outputs(dtype, tile):
    from gemmakit.quant import DenseLinear, PackedEmbedding, fuse_decode

    model = tiny().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n: p for n, p in model.named_parameters() if "proj" in n}
    tokens = torch.tensor([[1, 2, 3, 4]])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    with torch.no_grad():
        ref, ref_embed = model(tokens), model.embed(tokens)
        fuse_decode(model)
        fuse_decode(model)  # idempotent
        assert model.model.embed_tokens.tile == tile  # fp32 keeps its rows
        torch.testing.assert_close(model.embed(tokens), ref_embed, rtol=0, atol=0)
        torch.testing.assert_close(model(tokens), ref, **tol)  # the head's products now run per tile
    after = model.state_dict()
    assert after.keys() == before.keys()  # the checkpoint's names and shapes and values
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert all(p is linears[n] for n, p in model.named_parameters() if "proj" in n)  # the same Parameters
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    assert isinstance(model.model.layers[0].mlp.up_proj, DenseLinear)

    fresh = tiny().to(dtype)
    fuse_decode(fresh)
    fresh.load_state_dict(before)  # loads the checkpoint's [vocab, d_model] into the packed table
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)
    wrong = dict(before, **{"model.embed_tokens.weight": before["model.embed_tokens.weight"][:100]})
    with pytest.raises(RuntimeError, match=r"size mismatch for model\.embed_tokens\.weight.*\[100, 64\]"):
        fresh.load_state_dict(wrong)

    quantize(model, "int8")  # quantizing after fusing still converts every matrix, from the right table
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    unfused = quantize(tiny().to(dtype), "int8")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), unfused(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("vocab, dtype, tile", [(128, torch.bfloat16, 32), (100, torch.bfloat16, 4),
                                                (128, torch.float32, 1)])  # 4 = gcd(100, 32)
@pytest.mark.parametrize("rows", [1, 3, 40])  # eager per-tile product (few rows) and BLAS on unpacked blocks
def test_packed_embedding_equals_the_table(vocab, dtype, tile, rows, monkeypatch):
    from gemmakit.quant import PackedEmbedding

    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 24 * 16)  # blocks of 24 rows: several, tile-aligned
    table = torch.randn(vocab, 16).to(dtype)
    emb = PackedEmbedding(table)
    assert emb.weight.shape == (vocab // tile, 16, tile)
    tokens = torch.randint(0, vocab, (2, 5))
    torch.testing.assert_close(emb(tokens), table[tokens], rtol=0, atol=0)
    torch.testing.assert_close(emb.unpacked(), table, rtol=0, atol=0)
    h = torch.randn(rows, 16).to(dtype)
    want = h.float() @ table.float().T
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(emb.attend(h).float(), want, **tol)
    if rows <= quant.DECODE_ROWS:  # the fused decode product
        compiled = torch.compile(emb.attend, dynamic=False, fullgraph=True)
        torch.testing.assert_close(compiled(h).float(), want, **tol)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("vocab, tile", [(128, 32), (100, 4)])  # 4 = gcd(100, 32)
def test_fuse_decode_tiles_a_quantized_head_in_place(mode, vocab, tile, monkeypatch):
    """The int8/fp8 LM head is re-laid out as tiles for the compiled step: same values, same checkpoint,
    same products eagerly (blocked dequantization) and compiled (the tiled loop); and back to rows."""
    from gemmakit.quant import fuse_decode

    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 24 * 64)  # several blocks of rows, tile-aligned
    model = quantize(tiny(vocab_size=vocab).to(torch.bfloat16), mode)
    table = model.model.embed_tokens.table
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = table.dequantize()
    h = torch.randn(3, 64, dtype=torch.bfloat16)
    tokens = torch.randint(0, vocab, (2, 5))
    with torch.no_grad():
        ref, ref_embed = model.model.embed_tokens.attend(h), model.model.embed_tokens(tokens)
        storage = table.weight.untyped_storage().data_ptr()
        fuse_decode(model)
        fuse_decode(model)  # idempotent
        assert table.tile == tile and table.weight.shape == (vocab // tile, 64, tile)
        assert table.weight.untyped_storage().data_ptr() == storage  # in place: no second copy
        torch.testing.assert_close(table.dequantize(), rows, rtol=0, atol=0)
        torch.testing.assert_close(table.dequantize(5, 70), rows[5:70], rtol=0, atol=0)
        torch.testing.assert_close(model.model.embed_tokens(tokens), ref_embed, rtol=0, atol=0)
        torch.testing.assert_close(model.model.embed_tokens.attend(h), ref, rtol=2e-2, atol=2e-2)
        compiled = torch.compile(model.model.embed_tokens.attend, dynamic=False, fullgraph=True)
        torch.testing.assert_close(compiled(h), ref, rtol=2e-2, atol=2e-2)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items())
    fresh = quantize(tiny(vocab_size=vocab).to(torch.bfloat16), mode)
    fuse_decode(fresh)
    fresh.load_state_dict(before)  # the checkpoint's [vocab, d_model] goes into the tiles
    assert torch.equal(fresh.model.embed_tokens.table.weight.view(torch.uint8), table.weight.view(torch.uint8))
    table.retile(1)
    assert table.tile == 1 and torch.equal(table.weight.view(torch.uint8), before["model.embed_tokens.table.weight"].view(torch.uint8))


def test_a_model_after_compiled_decoding_still_trains_and_saves(monkeypatch):
    # compile=True packs the tied embedding in place (fuse_decode), under generate's inference mode:
    # the model must stay an ordinary trainable model that saves its checkpoint. (The compiled step
    # itself takes the weights as inputs and changes nothing; it is not built here, to save the time.)
    from gemmakit import engine
    from gemmakit.engine import generate

    monkeypatch.setattr(engine, "compiled_step", lambda *args: None)
    model = tiny().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    list(generate(model, [[1, 5, 9]], 3, compile=True))
    assert model.model.embed_tokens.tile == 32
    assert not any(p.is_inference() for p in model.parameters())
    after = model.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    loss = torch.nn.functional.cross_entropy(model(tokens)[0, :-1].float(), tokens[0, 1:])
    loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and grad.shape == model.model.embed_tokens.weight.shape and grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, None])
def test_compiled_product_reads_its_input_from_a_buffer(cls):
    """An RMSNorm feeding the fused product is computed once, not once per output row.

    Inlined into the product's loop, the norm's square root ran for every one of the LM head's
    262,144 rows and halved its speed. The kernel that reads the weights must not take a square root.
    """
    from torch._inductor.utils import run_and_get_code

    from gemmakit.model import RMSNorm
    from gemmakit.quant import DenseLinear

    lin = nn.Linear(64, 96, bias=False)
    proj = DenseLinear(lin) if cls is None else cls.from_linear(lin)
    proj.kernel = False  # inductor's loop (gemmakit's C++ kernels, where they run, read a buffer anyway)
    norm = RMSNorm(64, 1e-6)
    x = torch.randn(2, 64)  # two rows: one fp32 row would go to BLAS, which reads a buffer anyway
    torch._dynamo.reset()
    with torch.no_grad():
        want = norm(x) @ proj.dequantize().T
        out, (code,) = run_and_get_code(torch.compile(lambda x: proj(norm(x)), dynamic=False, fullgraph=True), x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # The loop nests over the 96 output rows: from each such `x0` loop header to the next `x0` loop.
    header = "static_cast<int64_t>(0L); x0<static_cast<int64_t>(96L)"
    nests = [n for n in code.split("for(int64_t x0=")[1:] if n.startswith(header)]
    assert "std::sqrt" in code and nests, "expected a norm and a loop over the output rows in the generated code"
    assert not any("std::sqrt" in n for n in nests), "the norm is recomputed inside the product's loop"


# -- eager products: torch's int8 / int4 kernels --------------------------------------------------------

@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dtype, rows", [(torch.float32, 1), (torch.float32, 16), (torch.bfloat16, 1),
                                         (torch.bfloat16, 40)])
def test_library_products_equal_dequantize_then_matmul(cls, dtype, rows, monkeypatch):
    # Eagerly (decode, prefill, perplexity) the products are torch's kernels on the stored integers (int4:
    # converted exactly to torch's layout); they equal x @ dequantize().T up to fp32 rounding (bf16:
    # rounding of the bf16 result). 128 x 96: rows a multiple of 64, several int4 groups.
    lin = nn.Linear(96, 128, bias=False).to(dtype)
    m = cls.from_linear(lin)
    x = torch.randn(1, rows, 96).to(dtype)
    want = x.float() @ m.dequantize().float().T
    assert quant._library(x)
    monkeypatch.setattr(quant, "_blocked", None)  # the dequantizing path would fail: it is not taken
    with torch.no_grad():
        y = m(x)
    assert y.shape == (1, rows, 128) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), want, **tol)


def test_int4_kernel_layout_is_made_in_row_blocks_and_follows_the_weights(monkeypatch):
    # Converted a block at a time (torch's layout interleaves 64 rows: blocks are multiples of 64), equal
    # to the whole matrix's conversion; rebuilt when the weights change in place.
    lin = nn.Linear(64, 256, bias=False)
    whole = Int4Linear.from_linear(lin)
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = whole(x)
        monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 64 * 70)  # blocks of 64 rows
        blocked = Int4Linear.from_linear(lin)
        torch.testing.assert_close(blocked(x), want, rtol=0, atol=0)
        blocked.load_state_dict(Int4Linear.from_linear(nn.Linear(64, 256, bias=False)).state_dict())
        torch.testing.assert_close(blocked(x), x @ blocked.dequantize().T, rtol=1e-5, atol=1e-5)


def test_library_products_are_not_used_with_autograd_or_many_fp32_rows():
    lin = Int8Linear.from_linear(nn.Linear(64, 64, bias=False))
    assert not quant._library(torch.randn(1, 64, requires_grad=True))  # the kernels have no backward
    assert not quant._library(torch.randn(40, 64))  # fp32 prefill: dequantize + BLAS was faster
    x = torch.randn(3, 64, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None


# -- the formats of quantization-aware training: int4-channel, q4_0, q8_0, fp8 --------------------------

@pytest.mark.parametrize("mode", ["q4_0", "q8_0"])
def test_block_formats_are_llama_cpps_reference_quantization(mode):
    """q4_0 / q8_0 weights equal the `gguf` package's reference quantize + dequantize (llama.cpp's), exactly."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize as gguf_quantize

    qtype = GGMLQuantizationType[mode.upper()]
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.1
    w[3, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    w[4, 5] = -0.9  # a block whose largest magnitude is negative: Q4_0 keeps its sign in d
    ref = dequantize(gguf_quantize(w.numpy(), qtype), qtype).reshape(w.shape)
    assert torch.equal(quant.fake_quantize(w, mode), torch.from_numpy(ref))


class Q8_0Input(nn.Module):
    """A float Linear whose input is first rounded to Q8_0 blocks and back: q4_0's product, in floats
    (y = sum_b d dx (q . xq - 8 sx) = W_deq . x_rounded, exact but for the order of the fp32 sums)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    @staticmethod
    def rounded(x: torch.Tensor) -> torch.Tensor:
        q, d, _ = quant.quantize_q8_0_activations(x.reshape(-1, x.shape[-1]))
        return (q.float() * d[..., None]).reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rounded(x))


class Q8_0Head(nn.Module):
    """The tied embedding, its head's input rounded to Q8_0 blocks (see Q8_0Input)."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.weight = emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return Q8_0Input.rounded(h) @ self.weight.T


def float_twin(model, mode: str):
    """The float model computing what `quantize(model, mode)` computes: weights on the format's grid
    (fake_quantize, QAT's view) and, for q4_0, inputs of every product rounded to Q8_0 blocks."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(quant.fake_quantize(p, mode))
    if mode == "q4_0":
        for parent in list(model.model.layers.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Q8_0Input(child))
        model.model.embed_tokens = Q8_0Head(model.model.embed_tokens)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-channel", "q4_0", "q8_0", "fp8"])
def test_every_format_equals_a_float_model_with_its_grid(mode):
    """A quantized model's logits equal those of the float model whose weights are fake_quantize'd (QAT's
    view; q4_0 also rounds the activations to Q8_0 blocks, as llama.cpp), eager prefill and every
    product path; bytes as weight_bytes plans them."""
    model, ref = tiny(), float_twin(tiny(), mode)
    quantize(model, mode)
    with torch.no_grad():
        tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
    stored = sum(t.nbytes for t in model.state_dict().values())
    assert stored == weight_bytes(model.config, mode, dtype_bytes=4)


@pytest.mark.slow
def test_new_formats_compile_and_equal_eager_decoding():
    from gemmakit.engine import generate

    for mode in ("q8_0", "fp8", "q4_0"):
        model = quantize(tiny(), mode)
        eager = list(generate(model, [[2, 5, 7], [2, 9]], 6))
        assert list(generate(model, [[2, 5, 7], [2, 9]], 6, compile=True)) == eager, mode


@pytest.mark.parametrize("rows", [2, 8, 16])
def test_compiled_decode_products_at_every_batch_equal_eager(rows):
    # Compiled, a float or int8 layer leaves the fused loop for the library's product above
    # FUSED_LAYER_ROWS rows, while the LM head keeps the fused loop up to DECODE_ROWS: whichever path a
    # batch takes, it computes the eager product (fp32 exactly up to summation order; bf16 up to rounding).
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False).requires_grad_(False)
    cases = [(quant.DenseLinear(lin), torch.float32, 1e-5),
             (quant.DenseLinear(nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False)), torch.bfloat16, 2e-2),
             (Int8Linear.from_linear(lin.to(torch.bfloat16)), torch.bfloat16, 2e-2),
             (Int8Linear.from_linear(lin.float()), torch.float32, 1e-5)]
    head = QuantEmbedding(Int8Linear.from_linear(nn.Linear(64, 96, bias=False).to(torch.bfloat16)))
    for m, dtype, tol in cases + [(head, torch.bfloat16, 2e-2)]:
        f = m.attend if isinstance(m, QuantEmbedding) else m
        x = torch.randn(rows, 64).to(dtype)
        with torch.no_grad():
            eager = f(x).float()
            compiled = torch.compile(f, dynamic=False, fullgraph=True)(x).float()
        torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol * eager.abs().max().item())
    assert quant.FUSED_LAYER_ROWS < 8 <= quant.DECODE_ROWS  # the 8-row case takes the library path in a layer


@pytest.mark.parametrize("rows", [64, 192, 70])
def test_int4_storage_is_torch_kernels_layout(rows):
    # One layout for every path: the bytes torch's own conversion makes (rows padded to 64 with zeros),
    # read back exactly; the state dict and `weight` keep GGUF's block order.
    q = torch.randint(0, 16, (rows, 96), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    packed = quant.to_kernel_layout(q)
    padded = torch.cat([q, q.new_zeros(-rows % 64, 96)]).int()
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1))
    assert torch.equal(quant.from_kernel_layout(packed)[:rows], q)
    lin = nn.Linear(96, rows, bias=False)
    m = Int4Linear.from_linear(lin)
    blocks, scale, low = quantize_int4(lin.weight.detach(), 32)
    assert torch.equal(m.weight, blocks) and torch.equal(m.state_dict()["weight"], blocks)
    tokens = torch.tensor([[0, rows - 1, 33], [63 % rows, 31, rows // 2]])
    torch.testing.assert_close(m.rows(tokens), m.dequantize()[tokens], rtol=0, atol=0)  # the embedding lookup
    assert torch.equal(m.dequantize(5, rows - 3), m.dequantize()[5:rows - 3])


@pytest.mark.parametrize("mode", ["int4", "int4-channel"])
def test_int4_decode_products_compiled_read_the_kernel_layout(mode):
    # bf16: torch's int4 kernel inside the compiled step (rows up to DECODE_ROWS); fp32: the compiled
    # loop over the same bytes, equal to the dequantized product to fp32 rounding.
    lin = nn.Linear(320, 192, bias=False)
    m = Int4Linear.from_linear(lin, 320 if mode == "int4-channel" else 32)
    assert m.kernel_group == 32  # int4-channel too: its one scale per row repeated per group of 32
    f = torch.compile(lambda x: m.fused(x), fullgraph=True)
    for rows in (1, 3):
        x = torch.randn(rows, 320)
        with torch.no_grad():
            torch.testing.assert_close(f(x), x @ m.dequantize().T, rtol=1e-5, atol=1e-5)
    mb = Int4Linear.from_linear(lin.to(torch.bfloat16), 320 if mode == "int4-channel" else 32)
    x = torch.randn(2, 320).to(torch.bfloat16)
    with torch.no_grad():
        y = torch.compile(lambda x: mb.fused(x), fullgraph=True)(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ mb.dequantize().float().T, rtol=1e-2, atol=2e-2)


# -- w8a8: int8 weights times per-token int8 activations ---------------------------------------------------

def w8a8_reference(m: quant.W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """The definition, with the integer products summed in int64 (exactly): per-token symmetric int8 of x."""
    xf = x.float().reshape(-1, m.in_features)
    sx = xf.abs().amax(-1, keepdim=True) / 127
    qx = torch.round(xf / sx).clamp(-127, 127)
    acc = (qx.long() @ m.weight.long().t()).float()
    return (acc * sx * m.scale.float()).to(x.dtype).view(*x.shape[:-1], m.out_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_is_int8_weights_times_int8_activations_per_token(dtype):
    lin = nn.Linear(96, 40, bias=False).to(dtype).requires_grad_(False)
    m = quant.W8A8Linear.from_linear(lin)
    w8 = Int8Linear.from_linear(lin)
    assert torch.equal(m.weight, w8.weight) and torch.equal(m.scale, w8.scale)  # int8's weights, same state dict
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0] *= 50  # one loud token: its scale is its own, the others' are not coarsened by it
    y = m(x)
    assert y.dtype == dtype and y.shape == (3, 7, 40)
    assert torch.equal(y, w8a8_reference(m, x))
    q, s = quant.quantize_activations(x)
    assert q.dtype == torch.int8 and int(q.abs().amax(-1).min()) == 127  # every token uses the whole range
    assert torch.equal(s.squeeze(-1), x.float().abs().amax(-1) / 127)
    assert 0 < (y.float() - w8(x).float()).norm() / w8(x).float().norm() < 0.02  # the activations' rounding


@pytest.mark.parametrize("width", [64, quant.EXACT_FP32_INPUTS + 16])
def test_w8a8_gives_each_row_the_same_bits_whatever_the_batch_or_path(width):
    """Integer sums are exact: the compiled head (an fp32 loop for one row, torch._int_mm for more), a
    compiled layer and eager products agree bit for bit at every batch size, with the largest values the
    format has (every product 127 * 127: the fp32 loop's worst case)."""
    torch._dynamo.reset()  # 6 compilations of the same code: the earlier tests' count toward the limit
    torch.manual_seed(0)
    lin = nn.Linear(width, 96, bias=False).to(torch.bfloat16).requires_grad_(False)
    head = QuantEmbedding(quant.W8A8Linear.from_linear(lin))
    head.table.weight[:4] = 127
    x = torch.randn(16, width).to(torch.bfloat16)
    x[:2] = 1.0  # rows quantized to all 127s
    with torch.no_grad():
        alone = torch.cat([head.attend(x[i:i + 1]) for i in range(16)])
        assert torch.equal(alone, w8a8_reference(head.table, x))
        for rows in (1, 2, 16):
            f = torch.compile(head.attend, dynamic=False, fullgraph=True)
            assert torch.equal(f(x[:rows]), alone[:rows]), rows
            g = torch.compile(head.table, dynamic=False, fullgraph=True)  # as a layer: torch._int_mm
            assert torch.equal(g(x[:rows]), alone[:rows]), rows


def test_w8a8_model_decodes_compiled_as_eager_and_batched_as_alone():
    from gemmakit.engine import generate

    model = quantize(tiny(), "w8a8")
    assert all(type(m) is quant.W8A8Linear for m in model.modules() if isinstance(m, quant.QUANTIZED))
    assert model.model.embed_tokens.table.tile == 1  # fuse_decode leaves its rows (torch._int_mm reads rows)
    prompts = [[2, 5, 7, 9, 11], [2, 9], [2, 30, 31]]
    eager = list(generate(model, prompts, 6))
    assert list(generate(model, prompts, 6, compile=True)) == eager
    for i, p in enumerate(prompts):
        assert [t[0] for t in generate(model, [p], 6, compile=True)] == [t[i] for t in eager]
    stored = sum(t.nbytes for t in model.state_dict().values())
    assert stored == weight_bytes(model.config, "w8a8", dtype_bytes=4)
