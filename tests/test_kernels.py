"""gemmakit's C++ kernels (gemmakit/kernels): the bf16, int8, fp8 and q8_0 decode products against float64,
row bits alone and in a batch, the compiled decode step calling them; every build (AVX-512, AVX2, plain
C++); one build per machine, rebuilt when damaged. The Q4_0 kernel's arithmetic is tested in test_q4_0.py."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from gemmakit import kernels, quant
from gemmakit.compiled import _cpu

from test_q4_0 import inputs, module

AVX512 = kernels.load() and torch.ops.gemmakit.bf16_isa() == "avx512"


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).bfloat16()


def acts(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close_to_float64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x @ w.T summed in fp32: within fp32 rounding of the sum of |terms| (and y's own rounding)."""
    ref = x.double() @ w.double().T
    bound = x.double().abs() @ w.double().abs().T
    eps = 1e-6 if y.dtype == torch.float32 else 2 ** -8  # bf16 output: one rounding of the result
    assert ((y.double() - ref).abs() <= eps * bound + 1e-30).all()


SHAPES = [(640, 1024), (2048, 640), (100, 37), (33, 6)]  # k % 32 tails and n % 4 ends included


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_linear_is_the_product_summed_in_fp32(k, n, dtype):
    w = weights(n, k)
    for m in (1, 3, 4, 5):
        x = acts(m, k, dtype)
        y = torch.ops.gemmakit.bf16_linear(x, w)
        assert y.dtype == dtype and y.shape == (m, n)
        close_to_float64(y, x, w)
        for r in range(m):  # a row alone gets the bits it gets in the batch
            assert torch.equal(torch.ops.gemmakit.bf16_linear(x[r:r + 1], w)[0], y[r])


@pytest.mark.parametrize("k, tiles", [(640, 40), (33, 2)])  # an odd width: the last input alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_tiles_is_the_product_of_the_packed_table(k, tiles, dtype):
    w = weights(32 * tiles, k)
    packed = quant.pack_rows(w, 32)
    for m in (1, 2, 4, 7):
        x = acts(m, k, dtype)
        y = torch.ops.gemmakit.bf16_tiles(x, packed)
        assert y.dtype == dtype and y.shape == (m, 32 * tiles)
        close_to_float64(y, x, w)
        for r in range(m):
            assert torch.equal(torch.ops.gemmakit.bf16_tiles(x[r:r + 1], packed)[0], y[r])


def exact(layer: torch.nn.Module) -> torch.Tensor:
    """An 8-bit layer's weights in float64: q * scale per row (int8, fp8) or per block of 32 (q8_0)."""
    q = quant.unpack_rows(layer.weight) if layer.weight.dim() == 3 else layer.weight
    q = q.double()
    if isinstance(layer, quant.BlockInt8Linear):
        return (q.view(q.shape[0], -1, 32) * layer.scale.double()[..., None]).view(q.shape)
    return q * layer.scale.double()[:, None]


def check_product(op, layer: torch.nn.Module, k: int, dtype: torch.dtype, seed: int) -> None:
    """op(x, weight, scale) against float64, a row's bits alone and in a batch; layer.fused calls op."""
    g = torch.Generator().manual_seed(seed)
    for rows in (1, 3, 4, 5):
        x = torch.randn(rows, k, generator=g).to(dtype)
        y = op(x, layer.weight, layer.scale)
        assert y.dtype == dtype and y.shape == (rows, layer.out_features)
        close_to_float64(y, x, exact(layer))
        for r in range(rows):
            assert torch.equal(op(x[r:r + 1], layer.weight, layer.scale)[0], y[r])
        if AVX512:
            assert torch.equal(layer.fused(x), y)


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [quant.Int8Linear, quant.Fp8Linear])
def test_int8_and_fp8_kernels_are_the_product_of_the_dequantized_weights(cls, k, n, dtype):
    """int8_linear / fp8_linear (rows) and int8_tiles / fp8_tiles (the retiled head) against float64 on
    q * scale; Int8Linear.fused and Fp8Linear.fused call them."""
    m = cls.from_linear(nn.Linear(k, n, bias=False).to(dtype))
    tiled = cls.from_linear(nn.Linear(k, 64, bias=False).to(dtype))
    tiled.retile(32)
    rows, tiles = (getattr(torch.ops.gemmakit, name) for name in cls.OPS)
    check_product(rows, m, k, dtype, n)
    check_product(tiles, tiled, k, dtype, n + 1)


@pytest.mark.parametrize("k, n", [(640, 1024), (2048, 640), (96, 37), (32, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_0_kernel_is_the_product_of_the_dequantized_blocks(k, n, dtype):
    m = quant.BlockInt8Linear.from_linear(nn.Linear(k, n, bias=False).to(dtype))
    check_product(torch.ops.gemmakit.q8_0_linear, m, k, dtype, n)


def test_fp8_kernels_widen_every_code_exactly():
    """All 254 finite e4m3 codes (signs, subnormals, 448 included) through both layouts: times one-hot
    rows, each output is code * scale exactly (fp32)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    codes = torch.cat([codes, codes[:2]]).view(torch.float8_e4m3fn)  # 256: 8 tiles of 32 rows
    k = 32
    m = quant.Fp8Linear(k, 256, torch.float32)
    m.weight.copy_(codes.repeat(k, 1).T)  # row i: code i in every column
    m.scale.copy_(torch.rand(256) + 0.5)
    tiled = quant.Fp8Linear(k, 256, torch.float32)
    tiled.load_state_dict(m.state_dict())
    tiled.retile(32)
    x = torch.eye(k)
    want = (codes.float() * m.scale)[None].expand(k, -1)
    assert torch.equal(torch.ops.gemmakit.fp8_linear(x, m.weight, m.scale), want)
    assert torch.equal(torch.ops.gemmakit.fp8_tiles(x, tiled.weight, tiled.scale), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_dequantize_gives_torchs_values(dtype):
    """fp8_dequantize (Fp8Linear's prefill weights) equals torch's q.to(dtype) * scale bit for bit: every
    code, widths with a tail (k % 16), rows and the retiled head."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    for k in (254, 37):
        m = quant.Fp8Linear(k, 64, dtype)
        m.weight.copy_(codes[torch.randperm(254 * 64 * 2)[:64 * k] % 254].view(64, k).view(torch.float8_e4m3fn))
        m.scale.copy_(torch.rand(64, dtype=torch.float64).to(dtype) * 10.0 ** torch.randint(-6, 2, (64,)))
        want = m.weight.to(dtype) * m.scale[:, None]
        got = torch.ops.gemmakit.fp8_dequantize(m.weight, m.scale)
        assert got.dtype == dtype and torch.equal(got, want)
        if kernels.int8():
            assert torch.equal(m.dequantize(5, 40), want[5:40])
            m.retile(32)
            assert torch.equal(m.dequantize(5, 40), want[5:40])


def test_bf16_kernels_name_bad_input():
    w = weights(8, 64)
    with pytest.raises(RuntimeError, match="input width 32 != the weights' 64"):
        torch.ops.gemmakit.bf16_linear(acts(1, 32, torch.float32), w)
    with pytest.raises(RuntimeError, match="weights must be contiguous bfloat16"):
        torch.ops.gemmakit.bf16_linear(acts(1, 64, torch.float32), w.float())
    with pytest.raises(RuntimeError, match=r"tiles must be \[out / 32, in, 32\]"):
        torch.ops.gemmakit.bf16_tiles(acts(1, 64, torch.float32), w.view(1, 8, 64))


@pytest.mark.skipif(not AVX512, reason="the bf16 kernels run in the decode step only where built with AVX-512")
def test_the_compiled_decode_step_runs_the_bf16_kernels():
    """A bf16 model's fused layers and tiled head call the kernels under torch.compile (the very bits of
    the op, which inductor's own loop would not give), and only there: eagerly, BLAS. So do int8, fp8
    and q8_0 layers."""
    torch.manual_seed(0)
    layer = quant.DenseLinear(nn.Linear(640, 256, bias=False).to(torch.bfloat16).requires_grad_(False))
    head = quant.PackedEmbedding(weights(64 * 32, 640))
    assert layer.kernel and head.kernel
    x = acts(2, 640, torch.bfloat16)
    with torch.no_grad():
        for f, op, w in ((layer, torch.ops.gemmakit.bf16_linear, layer.weight),
                         (head.attend, torch.ops.gemmakit.bf16_tiles, head.weight)):
            compiled = torch.compile(f, dynamic=False, fullgraph=True)(x)
            assert torch.equal(compiled, op(x, w))
            close_to_float64(f(x), x, w if w.dim() == 2 else head.unpacked())
    for cls, op in ((quant.Int8Linear, "int8_linear"), (quant.Fp8Linear, "fp8_linear"),
                    (quant.BlockInt8Linear, "q8_0_linear")):
        m = cls.from_linear(nn.Linear(640, 256, bias=False).to(torch.bfloat16))
        with torch.no_grad():
            compiled = torch.compile(m, dynamic=False, fullgraph=True)(x)
        assert torch.equal(compiled, getattr(torch.ops.gemmakit, op)(x, m.weight, m.scale)), op
    fp32 = quant.DenseLinear(nn.Linear(64, 32, bias=False))
    assert not fp32.kernel and not quant.PackedEmbedding(torch.randn(64, 16)).kernel


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the builds compared are x86's")
def test_every_build_of_the_kernels(tmp_path):
    """Built for AVX2 (no VNNI, no AVX-512) and as plain C++: the Q4_0 kernel gives this machine's build's
    bits; the plain bf16 loops (which sum in another order) the product within fp32 rounding."""
    builds = [("gemmakit_cxx", "x86-64")]
    if {"avx2", "fma", "f16c"} <= set(_cpu().split()):
        builds.append(("gemmakit_avx2", "x86-64-v3"))
    m, x = module(), inputs(11)
    with torch.no_grad():
        want = m(x)
    w = weights(37, 100)
    for namespace, arch in builds:
        (tmp_path / namespace).mkdir()
        kernels.build(namespace, tmp_path / namespace, [f"-march={arch}", f"-DGK_NAMESPACE={namespace}"])
        op = getattr(torch.ops, namespace)
        assert op.q4_0_isa() == ("c++" if arch == "x86-64" else "avx2")
        assert torch.equal(op.q4_0_linear(x, m.packed, m.d.view(torch.float16), m.out_features), want), namespace
        assert op.bf16_isa() == "c++"
        xb = acts(3, 100, torch.float32)
        close_to_float64(op.bf16_linear(xb, w), xb, w)
        tiles = weights(64, 33)
        xt = acts(2, 33, torch.float32)
        close_to_float64(op.bf16_tiles(xt, quant.pack_rows(tiles, 32)), xt, tiles)
        assert op.int8_isa() == "c++"
        for cls, name in ((quant.Int8Linear, "int8_linear"), (quant.Fp8Linear, "fp8_linear")):
            layer = cls.from_linear(nn.Linear(100, 37, bias=False))
            close_to_float64(getattr(op, name)(xb, layer.weight, layer.scale), xb, exact(layer))
        q8 = quant.BlockInt8Linear.from_linear(nn.Linear(96, 37, bias=False))
        xq = acts(3, 96, torch.float32)
        close_to_float64(op.q8_0_linear(xq, q8.weight, q8.scale), xq, exact(q8))


def test_kernels_are_built_once_per_machine_and_rebuilt_when_damaged(tmp_path):
    env = {**os.environ, "GEMMAKIT_HOME": str(tmp_path)}
    code = "from gemmakit import kernels; print(kernels.load())"

    def run() -> tuple[str, str]:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        return r.stdout.strip(), "\n".join(ln for ln in r.stderr.splitlines() if "Warning" not in ln)

    out, err = run()
    assert out == "True" and "building gemmakit's kernels for this CPU, once" in err
    out, err = run()
    assert out == "True" and err == ""  # built: loaded, nothing said
    (library,) = tmp_path.glob("kernels/*/gemmakit_kernels.so")
    library.write_bytes(library.read_bytes()[:1000])  # a truncated file
    out, err = run()
    assert out == "True" and "is damaged (checksum mismatch); rebuilding it" in err
    assert len(list(tmp_path.glob("kernels/*"))) == 1  # no temporary build left beside it


# -- where the decode step's weights live (quant.relocate) ---------------------------------------------

def test_fuse_decode_puts_each_layer_in_one_block_in_reading_order():
    """Same Parameter objects and values; a layer's tensors one after another in one block (64-byte
    aligned, in the order the layer registers them); the model computes what it computed."""
    from test_quant import tiny

    model = tiny().to(torch.bfloat16)
    tokens = torch.tensor([[1, 2, 3, 4]])
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    with torch.no_grad():
        ref = model(tokens)
        quant.fuse_decode(model)
        torch.testing.assert_close(model(tokens), ref, rtol=2e-2, atol=2e-2)  # the head's sums run per tile
    for name, p in model.named_parameters():
        if "embed_tokens" not in name:
            assert p is params[name] and torch.equal(p, before[name]), name
    for layer in model.model.layers:
        tensors = list(layer.parameters())
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storages) == 1
        ptrs = [t.data_ptr() for t in tensors]
        assert ptrs == sorted(ptrs) and all(p % 64 == 0 for p in ptrs)
        assert all(b - a >= t.nbytes for a, b, t in zip(ptrs, ptrs[1:], tensors))  # no overlap
    head = model.model.embed_tokens.weight
    assert torch.equal(quant.unpack_rows(head), before["model.embed_tokens.weight"])


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
                    or "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read(),
                    reason="no transparent huge pages on this machine")
def test_big_blocks_are_advised_as_huge_pages():
    block = quant._block(4 * quant.HUGE_PAGE)
    assert block.data_ptr() % quant.HUGE_PAGE == 0
    block.fill_(1)
    address = block.data_ptr()
    eligible = None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("THPeligible:"):
                eligible = line.split()[1]
    assert eligible == "1"
    small = quant._block(1000)  # below one huge page: ordinary memory
    assert small.numel() == 1000


def test_weights_are_moved_once():
    """fuse_decode again (each compiled generate calls it), or after quantize: nothing is copied again."""
    from test_quant import tiny

    model = quant.quantize(tiny().to(torch.bfloat16), "int8")
    where = {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    quant.fuse_decode(model)
    quant.fuse_decode(model)
    moved = {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert moved == where  # the int8 head retiled in place, nothing copied
    model = tiny().to(torch.bfloat16)
    quant.fuse_decode(model)
    where = {n: t.data_ptr() for n, t in model.named_parameters()}
    quant.fuse_decode(model)
    assert {n: t.data_ptr() for n, t in model.named_parameters()} == where
