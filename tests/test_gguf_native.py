"""Native Q4_0 / Q8_0 GGUF inference: the file's blocks become gemmakit's q4_0/q8_0 modules as they are
(no float copy of any quantized matrix), equal to quantizing the float model, in eager and compiled decoding;
damaged blocks are errors naming the tensor."""

from __future__ import annotations

import struct

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab, write_gguf as write_converted
from gemmakit import gguf, hub, quant
from gemmakit.cli import main
from gemmakit.export import gguf_name, write_gguf
from gemmakit.quant import BlockInt8Linear, Q4_0Linear, QuantEmbedding, quantize, weight_bytes
from gemmakit.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 512  # tiny_vocab needs room for its 256 byte pieces
MODULES = {"q4_0": Q4_0Linear, "q8_0": BlockInt8Linear}
Q4_0, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0


def _float(generation: int = 3, seed: int = 0):
    return random_model(tiny_config(generation).replace(vocab_size=VOCAB), seed=seed)


def _export(tmp_path, mode: str, generation: int = 3):
    """(the float model, the path of its `mode` GGUF export)."""
    model = _float(generation)
    path = write_gguf(model, Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB)), tmp_path / f"{mode}.gguf", mode,
                      progress=False)
    return model, path


def _matrices(model) -> dict[str, nn.Module]:
    """Every quantizable matrix's module by its HF weight name (the embedding's table included)."""
    out = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, (nn.Linear, *quant.QUANTIZED))}
    out.pop("model.embed_tokens.table.weight", None)
    emb = model.model.embed_tokens
    out["model.embed_tokens.weight"] = emb.table if isinstance(emb, QuantEmbedding) else emb
    return out


@pytest.mark.parametrize("generation", [1, 2, 3])
@pytest.mark.parametrize("mode", ["q4_0", "q8_0"])
def test_block_gguf_loads_as_its_blocks(tmp_path, mode, generation):
    """Every matrix of an exported Q4_0/Q8_0 file is a q4_0/q8_0 module whose buffers are
    quantize_q4_0/quantize_q8_0 of the original weights; in fp32 its weights are the gguf package's
    dequantization exactly; the logits equal quantize(float model, mode)'s (fp32, eager)."""
    original, path = _export(tmp_path, mode, generation)
    model, _ = hub.load(str(path), progress=False, native=True)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    raw = {t.name: t for t in GGUFReader(path).tensors}
    for name, m in _matrices(model).items():
        assert type(m) is MODULES[mode], name
        w = dict(original.named_parameters())[name].detach()
        if mode == "q4_0":
            packed, d, low = quant.quantize_q4_0(w)
            assert torch.equal(m.weight, packed) and torch.equal(m.scale, d) and torch.equal(m.low, low), name
        else:
            q, d = quant.quantize_q8_0(w)
            assert torch.equal(m.weight, q) and torch.equal(m.scale, d), name
        t = raw[gguf_name(name, generation)]
        reference = dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert torch.equal(m.dequantize(), torch.from_numpy(reference)), name
    ref = quantize(original, mode)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
    assert sum(t.nbytes for t in model.state_dict().values()) == weight_bytes(model.config, mode, dtype_bytes=4)


class _FloatTensors(TorchDispatchMode):
    """Records the shape of every float tensor at least `numel` large that any torch op makes (off meta)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
                    and t.numel() >= self.numel):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("mode", ["q4_0", "q8_0"])
def test_native_load_makes_no_float_copy_of_a_matrix(tmp_path, mode, monkeypatch):
    """No float array of a quantized matrix is made while loading: the gguf package dequantizes only the
    norms, and no torch op makes a float tensor as large as the smallest matrix (a full-size float
    tensor from_numpy'd would show as the dtype cast). The model's bytes are the quantized format's."""
    _, path = _export(tmp_path, mode)
    dequantized = []
    real = gguf.dequantize

    def spy(data, qtype):
        out = real(data, qtype)
        dequantized.append((GGMLQuantizationType(qtype).name, out.size))
        return out

    monkeypatch.setattr(gguf, "dequantize", spy)
    config = tiny_config(3).replace(vocab_size=VOCAB)
    smallest = min(p.numel() for p in _float().parameters() if p.ndim == 2)
    with _FloatTensors(smallest) as recorder:
        model, _ = hub.load(str(path), progress=False, native=True)
    assert dequantized and all(kind == "F32" and size in (config.d_model, config.head_dim)
                               for kind, size in dequantized), dequantized  # the norms only
    # Only the int4 kernel's scales and zeros [in/32, rows, 2] (2 floats per 32 weights) may be that large.
    assert [s for s in recorder.seen if not (mode == "q4_0" and s[1][-1] == 2)] == []
    # The same check sees the float path's copies (so it would catch one here).
    with _FloatTensors(smallest) as recorder:
        hub.load(str(path), progress=False, native=False)
    assert recorder.seen
    assert sum(t.nbytes for t in model.state_dict().values()) == weight_bytes(model.config, mode, dtype_bytes=4)


def test_bf16_keeps_the_blocks_with_scales_in_bf16(tmp_path):
    """In bf16 the blocks are the same bytes; the fp16 scales are rounded to bf16, as quantize() keeps them."""
    original, path = _export(tmp_path, "q4_0")
    model, _ = hub.load(str(path), dtype=torch.bfloat16, progress=False, native=True)
    up = model.model.layers[0].mlp.up_proj
    packed, d, low = quant.quantize_q4_0(original.model.layers[0].mlp.up_proj.weight.detach())
    assert torch.equal(up.weight, packed) and up.scale.dtype == torch.bfloat16
    assert torch.equal(up.scale, d.bfloat16()) and torch.equal(up.low, low.bfloat16())
    assert model.dtype == torch.bfloat16


def test_mixed_file_loads_blocks_and_floats(tmp_path):
    """llama.cpp's layout: Q4_0 layers, a Q8_0 embedding, an F16 matrix and F32 norms. Each block tensor
    loads as its format's module, the F16 matrix as a float Linear; quantize(model, "q4_0") then keeps the
    Q4_0 modules as they are and quantizes the rest (the Q8_0 embedding via its dequantized weights)."""
    original = _float()
    path = write_converted(tmp_path / "mixed.gguf", original, tiny_vocab(VOCAB), default_qtype=Q4_0,
                           qtypes={"model.embed_tokens.weight": Q8_0,
                                   "model.layers.1.mlp.down_proj.weight": GGMLQuantizationType.F16})
    model, _ = hub.load(str(path), progress=False, native=True)
    assert type(model.model.embed_tokens.table) is BlockInt8Linear
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    kept = model.model.layers[0].mlp.up_proj
    quantize(model, "q4_0")
    assert model.model.layers[0].mlp.up_proj is kept
    ref = quantize(_float(), "q4_0")
    for name, m in _matrices(model).items():
        assert type(m) is Q4_0Linear, name
    down = model.model.layers[1].mlp.down_proj
    packed, _, _ = quant.quantize_q4_0(original.model.layers[1].mlp.down_proj.weight.detach().half().float())
    assert torch.equal(down.weight, packed)
    assert torch.equal(kept.weight, ref.model.layers[0].mlp.up_proj.weight)


def test_quantizing_to_another_format_uses_the_dequantized_blocks(tmp_path):
    """--quantize int8 on a Q4_0 file: the same model as dequantizing the file and quantizing that (the
    float path), never the Q4_0 modules left as they were."""
    _, path = _export(tmp_path, "q4_0")
    native, _ = hub.load(str(path), progress=False, native=True)
    floats, _ = hub.load(str(path), progress=False, native=False)
    assert type(floats.model.layers[0].mlp.up_proj) is nn.Linear
    quantize(native, "int8")
    quantize(floats, "int8")
    assert {k: type(m) for k, m in native.named_modules()} == {k: type(m) for k, m in floats.named_modules()}
    a, b = native.state_dict(), floats.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_cli_on_a_q4_0_file_equals_quantizing_the_float_model(tmp_path, capsys):
    """`generate` on the Q4_0 export prints what `--quantize q4_0` prints on the f32 export (same blocks)."""
    original = _float()
    tok = Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB))
    q4 = write_gguf(original, tok, tmp_path / "q4.gguf", "q4_0", progress=False)
    f32 = write_gguf(original, tok, tmp_path / "f32.gguf", "f32", progress=False)
    common = ["--max-new-tokens", "8", "--no-compile", "--dtype", "float32"]
    assert main(["generate", "the thesis", "--model", str(q4), *common]) == 0
    native = capsys.readouterr().out
    assert main(["generate", "the thesis", "--model", str(f32), "--quantize", "q4_0", *common]) == 0
    assert capsys.readouterr().out == native and len(native) > len("the thesis")


def test_a_block_file_computes_in_bf16_by_default_as_quantize_does(tmp_path, monkeypatch):
    """`--model F.gguf` with Q4_0 blocks and no --dtype: bf16 activations (the int4 kernel's), as with
    `--quantize q4_0`; a float GGUF stays fp32; --dtype still decides."""
    from gemmakit import cli

    original = _float()
    tok = Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB))
    q4 = write_gguf(original, tok, tmp_path / "q4.gguf", "q4_0", progress=False)
    f32 = write_gguf(original, tok, tmp_path / "f32.gguf", "f32", progress=False)
    args = cli.build_parser().parse_args
    assert cli._load(args(["generate", "x", "--model", str(q4)]))[0].dtype == torch.bfloat16
    assert cli._load(args(["generate", "x", "--model", str(f32)]))[0].dtype == torch.float32
    assert cli._load(args(["generate", "x", "--model", str(q4), "--dtype", "float32"]))[0].dtype == torch.float32


def _block_offset(path, name: str) -> int:
    (t,) = [t for t in GGUFReader(path).tensors if t.name == name]
    return t.data_offset


@pytest.mark.parametrize("mode", ["q4_0", "q8_0"])
def test_a_damaged_block_is_an_error_naming_the_tensor(tmp_path, mode):
    """A non-finite fp16 scale in one block: a one-line ValueError naming the tensor and the block."""
    _, path = _export(tmp_path, mode)
    data = bytearray(path.read_bytes())
    size = 18 if mode == "q4_0" else 34
    offset = _block_offset(path, "blk.1.ffn_up.weight") + 3 * size  # the scale of row 1's second block
    data[offset:offset + 2] = struct.pack("<H", 0x7E00)  # fp16 NaN
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        hub.load(str(bad), progress=False, native=True)
    msg = str(e.value)
    assert "blk.1.ffn_up.weight is corrupt" in msg and "\n" not in msg, msg


def test_a_damaged_float_tensor_is_an_error_naming_the_tensor(tmp_path):
    """The same kind of fault on the dequantizing path (any type): non-finite weights are refused."""
    _, path = _export(tmp_path, "f32")
    data = bytearray(path.read_bytes())
    offset = _block_offset(path, "blk.0.attn_k.weight") + 4 * 5
    data[offset:offset + 4] = struct.pack("<f", float("inf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor blk\.0\.attn_k\.weight is corrupt"):
        hub.load(str(bad), progress=False, native=True)


@pytest.mark.parametrize("mode", ["q4_0", "q8_0"])
def test_a_truncated_file_names_the_tensor(tmp_path, mode, capsys):
    _, path = _export(tmp_path, mode)
    data = path.read_bytes()
    cut = _block_offset(path, "blk.2.ffn_up.weight") + 40
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError) as e:
        hub.load(str(bad), progress=False, native=True)
    msg = str(e.value)
    assert f"{bad} is truncated: tensor blk.2.ffn_up.weight needs bytes up to" in msg and "\n" not in msg, msg
    assert main(["generate", "x", "--model", str(bad), "--no-compile"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blk.2.ffn_up.weight" in err and err.startswith("gemmakit: error:")


def test_native_false_and_k_quants_keep_float_weights(tmp_path):
    """native=False (training, adapters, exporting) gives float Linear layers, as a file with any type
    the modules do not hold (here Q5_0, like llama.cpp's K-quant mixes) always does."""
    _, path = _export(tmp_path, "q8_0")
    for kwargs in ({"native": False}, {}):  # the default: float weights, for everything that trains or saves
        model, _ = hub.load(str(path), progress=False, **kwargs)
        assert type(model.model.layers[0].mlp.up_proj) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    mixed = write_converted(tmp_path / "q5.gguf", _float(), tiny_vocab(VOCAB), default_qtype=Q8_0,
                            qtypes={"model.layers.0.mlp.up_proj.weight": GGMLQuantizationType.Q5_0})
    model, _ = hub.load(str(mixed), progress=False, native=True)
    assert not any(isinstance(m, quant.QUANTIZED) for m in model.modules())


@pytest.fixture(scope="module")
def compile_home(tmp_path_factory):
    """gemmakit's cache (where compiled steps are kept) in a temporary folder for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMAKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.mark.slow
def test_compiled_greedy_decoding_equals_eager(tmp_path, compile_home):
    """One AOTI build covers both modules: Q4_0 layers and a Q8_0 embedding / LM head (Gemma 1, 2 layers)."""
    from gemmakit.engine import generate

    original = random_model(tiny_config(1).replace(vocab_size=300, max_seq_len=64), seed=5)
    path = write_converted(tmp_path / "m.gguf", original, tiny_vocab(300), default_qtype=Q4_0,
                           qtypes={"model.embed_tokens.weight": Q8_0})
    model, _ = hub.load(str(path), progress=False, native=True)
    assert type(model.model.layers[0].mlp.up_proj) is Q4_0Linear
    assert type(model.model.embed_tokens.table) is BlockInt8Linear
    prompts = [[2, 5, 7], [2, 9]]
    eager = list(generate(model, prompts, 8))
    assert list(generate(model, prompts, 8, compile=True)) == eager
    assert type(model.model.layers[0].mlp.up_proj) is Q4_0Linear  # still the file's blocks


def test_saving_a_quantized_model_as_a_checkpoint_is_refused(tmp_path):
    """weights.save of a natively loaded (or quantize()'d) model: an error before anything is written,
    not a checkpoint of integer tensors under float names that nothing loads."""
    from gemmakit import weights

    for mode in ("q8_0", "q4_0"):
        model = quantize(_float(), mode)
        for dtype in (None, torch.bfloat16):  # a cast would have turned the integers into floats
            with pytest.raises(ValueError, match=r"has quantized weights \(model\.embed_tokens\.table\.weight: "):
                weights.save(model, tmp_path / "out", dtype=dtype)
    _, path = _export(tmp_path, "q4_0")
    model, _ = hub.load(str(path), progress=False, native=True)
    with pytest.raises(ValueError, match=r"has quantized weights \(model\.embed_tokens\.table\.weight: torch\.uint8\)"):
        weights.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    floats, _ = hub.load(str(path), progress=False, native=False)
    weights.save(floats, tmp_path / "out")
    assert weights.load(tmp_path / "out").config.vocab_size == VOCAB
