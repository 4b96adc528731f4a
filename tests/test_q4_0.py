"""q4_0 as llama.cpp computes it: Q4_0 weights times activations rounded to Q8_0 blocks, with exact integer
dot products (gemmakit's kernel, gemmakit/kernels/q4_0.cpp), against the definition in float64, across
batches and paths (eager, torch.compile, the AOTInductor package); its builds (AVX-512 VNNI, AVX2, plain C++)
in test_kernels.py."""

import pytest
import torch
from torch import nn

from gemmakit import quant
from gemmakit.quant import Q4_0Linear, quantize, quantize_q4_0

from test_quant import tiny


def definition(x: torch.Tensor, m: Q4_0Linear) -> torch.Tensor:
    """y = sum_b d dx (q . xq - 8 sx), in float64 from the module's GGUF blocks (llama.cpp's arithmetic)."""
    values = quant._group_values(m.weight, 32).double() - 8  # [out, in]
    d = m.state_dict()["scale"].double()  # fp16 -> exact
    q, dx, _ = quant.quantize_q8_0_activations(x.reshape(-1, m.in_features))
    xs = q.double() * dx.double()[..., None]  # [rows, in/32, 32]
    w = values.view(m.out_features, -1, 32) * d[..., None]
    return torch.einsum("rbi,obi->ro", xs, w)


def module(out_features: int = 200, in_features: int = 640, seed: int = 0) -> Q4_0Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g) * torch.rand(out_features, 1, generator=g))
        lin.weight[3, 64:96] = 0  # an all-zero block: d = 0
    return Q4_0Linear.from_linear(lin)


def inputs(rows: int, in_features: int = 640, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g) * 3
    x[0, :32] = 0  # an all-zero activation block
    x[-1, 32:64] = 1e4 * torch.randn(32, generator=g)  # one large block beside small ones
    return x


def test_kernel_is_llama_cpps_arithmetic():
    m = module()
    assert m.kernel, "the kernel did not build"
    x = inputs(19)
    with torch.no_grad():
        y = m(x)
    ref = definition(x, m)
    scale = ref.abs().amax(-1, keepdim=True)
    assert ((y.double() - ref).abs() / scale).max() < 1e-6
    # against torch's version of the same arithmetic (quant.q4_0_reference), which the kernel's fused
    # multiply-adds may beat by the last bit
    alt = quant.q4_0_reference(x, quant._group_values(m.weight, 32), m.state_dict()["scale"])
    torch.testing.assert_close(y, alt, rtol=1e-6, atol=1e-6 * float(scale.max()))


def test_each_row_gets_the_same_bits_whatever_the_batch_or_dtype():
    m, x = module(), inputs(19)
    with torch.no_grad():
        y = m(x)
        for rows in (1, 3, 8, 9, 17):  # the kernel's passes take 8 rows (AVX-512) or 4 at a time
            for start in range(0, 19 - rows + 1, 5):
                assert torch.equal(m(x[start:start + rows]), y[start:start + rows]), (rows, start)
        assert torch.equal(m(x.view(19, 1, 640)).view(19, 200), y)  # any leading shape
        xb = x.bfloat16()
        yb = m.to(torch.bfloat16)(xb)
    assert m.d.dtype == torch.int16 and yb.dtype == torch.bfloat16  # .to(dtype) leaves the fp16 scales
    with torch.no_grad():
        assert torch.equal(yb, m(xb.float()).bfloat16())  # bf16 in: the same rounding of the same values


def test_compiled_product_equals_eager_bit_for_bit():
    m, x = module(), inputs(3)
    torch._dynamo.reset()
    f = torch.compile(lambda t: m(t), fullgraph=True)
    with torch.no_grad():
        for rows in (1, 3):
            assert torch.equal(f(x[:rows]), m(x[:rows]))


def test_layout_state_dict_and_lookup():
    lin = nn.Linear(96, 40, bias=False)  # 40 rows: the last tile of 16 is padded
    m = Q4_0Linear.from_linear(lin)
    q, d, low = quantize_q4_0(lin.weight.detach())
    assert torch.equal(m.weight, q) and torch.equal(m.scale, d) and torch.equal(m.low, low)
    values = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    assert torch.equal(quant.from_tile_layout(quant.to_tile_layout(values)), values)
    w = m.dequantize()
    assert torch.equal(w, quant.fake_quantize(lin.weight.detach(), "q4_0"))
    assert torch.equal(m.dequantize(5, 37), w[5:37])
    tokens = torch.tensor([[0, 15, 16], [39, 17, 31]])
    assert torch.equal(m.rows(tokens), w[tokens])
    state = m.state_dict()
    assert set(state) == {"weight", "scale"} and state["scale"].dtype == torch.float16
    other = Q4_0Linear(96, 40, torch.float32)
    other.load_state_dict(state)
    assert torch.equal(other.packed, m.packed) and torch.equal(other.d, m.d)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        Q4_0Linear(96, 48, torch.float32).load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key.*scale"):
        other.load_state_dict({"weight": state["weight"]})


def test_reference_path_when_the_kernel_is_missing():
    m, x = module(), inputs(5)
    with torch.no_grad():
        y = m(x)
        m.kernel = False
        torch.testing.assert_close(m(x), y, rtol=1e-6, atol=1e-5)


def test_q4_0_model_decodes_compiled_as_eager_and_batched_as_alone(tmp_path, monkeypatch):
    """The compiled decode step (an AOTInductor package calling the kernel) gives eager's tokens, and each
    prompt in a batch the tokens it gets alone."""
    from gemmakit.engine import generate

    monkeypatch.setenv("GEMMAKIT_HOME", str(tmp_path))
    model = quantize(tiny(), "q4_0")
    assert all(type(m) is Q4_0Linear for m in model.modules() if isinstance(m, quant.QUANTIZED))
    prompts = [[2, 5, 7, 9, 11], [2, 9], [2, 30, 31]]
    eager = list(generate(model, prompts, 6))
    assert list(generate(model, prompts, 6, compile=True)) == eager
    for i, p in enumerate(prompts):
        assert [t[0] for t in generate(model, [p], 6, compile=True)] == [t[i] for t in eager]
