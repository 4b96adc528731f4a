"""QLoRA (`--quantize-base int8|int4` with `--lora-rank`): LoRA on a frozen int8/int4 base, dequantized a
block at a time in the forward and backward. Gradients reach the adapters only; a QLoRA run computes
what LoRA on the dequantized weights computes; int8's loss stays close to LoRA on the float base; the
saved adapter applies to the unquantized base with --adapter; the base takes far fewer bytes."""

import copy
import json

import pytest
import torch

from chat_vocab import SIZE, gemma3_vocab
from conftest import random_model, tiny_config
from gemmakit import cli, weights
from gemmakit.adapters import load_adapter, read_adapter
from gemmakit.config import get_config
from gemmakit.model import build
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import trainer as T
from gemmakit.train.chat_data import ChatData, prepare_chat
from gemmakit.train.lora import apply_lora, merge_lora, save_adapter
from gemmakit.train.losses import IGNORE, cross_entropy
from gemmakit.train.qlora import QuantLinear, QuantTable, quantize_base, stored_bytes

CFG = tiny_config(3).replace(vocab_size=SIZE)  # every input width a multiple of int4's group of 32


def batch(seed=0, b=2, t=12, vocab=CFG.vocab_size):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    targets[0, :5] = IGNORE
    return {"tokens": tokens, "targets": targets}


def loss_of(model, b):
    return cross_entropy(model, model.hidden(b["tokens"]), b["targets"], chunk=7)


def adapters(model, seed=5):
    """LoRA with B random too (B = 0 at init would give A no gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1, generator=g)
    return model


def dequantized(qmodel, base):
    """`base` with every weight replaced by the quantized model's dequantized values (fp32)."""
    m = copy.deepcopy(base)
    mods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers"):
                quantized = mods[name].base if hasattr(mods[name], "lora") else mods[name]
                mod.weight.copy_(quantized.q.dequantize().float())
        m.model.embed_tokens.weight.copy_(qmodel.model.embed_tokens.table.dequantize().float())
    return m


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gradients_reach_only_the_adapters_and_the_base_does_not_move(mode, tmp_path):
    base = random_model(CFG)
    q = quantize_base(copy.deepcopy(base), mode)
    assert all(not isinstance(m, torch.nn.Linear) for m in q.model.layers.modules())
    assert isinstance(q.model.embed_tokens, QuantTable)
    frozen = {k: v.clone() for k, v in q.state_dict().items()}
    assert apply_lora(q, rank=4, alpha=8) == 3 * 7
    adapters(q)
    loss_of(q, batch()).backward()
    with_grad = {n for n, p in q.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in q.named_parameters() if n.endswith((".lora.A", ".lora.B"))}
    assert all(float(p.grad.abs().max()) > 0 for p in q.parameters() if p.grad is not None)
    assert all(not t.requires_grad for t in q.buffers())
    # three optimizer steps: the quantized weights, scales and norms are exactly as they were
    data = _tiny_chat(tmp_path)
    T.train(q, data, T.TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup=1, ckpt_every=100),
            tmp_path / "run")
    after = q.state_dict()
    for k, v in frozen.items():
        key = k if k in after else k.replace(".q.", ".base.q.")  # LoRA wrapped the layer after the snapshot
        assert torch.equal(after[key], v), k


def _tiny_chat(tmp_path):
    tok = Tokenizer.from_gguf_vocab(gemma3_vocab())
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i}"},
                                                    {"role": "assistant", "content": f"it is {i}"}]}) + "\n"
                           for i in range(16)))
    prepare_chat([src], tok, 3, tmp_path / "chat", seq_len=32, val_fraction=0.0)
    return ChatData(tmp_path / "chat", "train", 32, 2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_computes_what_lora_on_the_dequantized_weights_computes(mode):
    """The block-wise dequantizing product and its backward are exact: loss and adapter gradients equal
    LoRA's on a float model holding the dequantized weights (fp32, 1e-5), with and without a gradient."""
    base = random_model(CFG)
    q = quantize_base(copy.deepcopy(base), mode)
    ref = dequantized(q, base)
    for m in (q, ref):
        apply_lora(m, rank=4, alpha=8)
        adapters(m)
    b = batch()
    lq, lr = loss_of(q, b), loss_of(ref, b)
    torch.testing.assert_close(lq, lr, rtol=1e-5, atol=1e-5)
    lq.backward()
    lr.backward()
    ref_params = dict(ref.named_parameters())
    for n, a in q.named_parameters():
        if a.requires_grad:
            torch.testing.assert_close(a.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # the inference path (quant.py's kernels) too
        torch.testing.assert_close(q(b["tokens"]), ref(b["tokens"]), rtol=1e-4, atol=1e-4)
    # under bf16 autocast the products run in bf16 and the adapters still get their gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = loss_of(q, b)
    q.zero_grad()
    lb.backward()
    assert abs(lb.item() - lq.item()) < 0.05 * lq.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in q.parameters() if p.requires_grad)


def test_qlora_int8_trains_like_lora_on_the_float_base(tmp_path):
    """Same data, same adapters' init, LoRA on the fp32 base against QLoRA.

    Tolerance: int8 rounds each weight to within max|w_row| / 254, a relative error of ~0.6% RMS of a
    row's largest weight for these Gaussian weights, which is uncorrelated across the d_model terms of
    each product and mostly averages out: the first loss (before any update) moves by ~1e-4 relative
    (measured 1.3e-4), asserted below 1e-3. Over the steps the optimizer amplifies the difference (the
    trajectories separate: measured 0.9% after 6 steps at lr 1e-2), asserted below 3%. int4 has 16
    levels per group of 32 weights: measured 1.0% at the start, 1.3% over the run; asserted 2% and 5%."""
    data = _tiny_chat(tmp_path)
    base = random_model(CFG, std=0.05)
    cfg = T.TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-2, warmup=1, ckpt_every=100)
    curves = {}
    for mode in (None, "int8", "int4"):
        m = copy.deepcopy(base)
        if mode:
            quantize_base(m, mode)
        apply_lora(m, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
        data.load_state_dict({"epoch": 0, "pos": 0})
        curves[mode] = [r["loss"] for r in T.train(m, data, cfg, tmp_path / str(mode))["log"]]
    assert curves[None][-1] < 0.8 * curves[None][0]
    assert curves["int8"][0] == pytest.approx(curves[None][0], rel=1e-3) and curves["int8"][0] != curves[None][0]
    assert curves["int8"] == pytest.approx(curves[None], rel=3e-2)
    assert curves["int4"][0] == pytest.approx(curves[None][0], rel=2e-2)
    assert curves["int4"] == pytest.approx(curves[None], rel=5e-2)


def test_the_adapter_is_for_the_unquantized_base(tmp_path):
    """save_adapter on a QLoRA model writes a PEFT adapter; load_adapter folds it into the float base,
    giving the QLoRA model's logits up to int8 rounding, and exactly those of LoRA on the dequantized
    base when folded into that. merge_lora refuses a quantized base."""
    base = random_model(CFG)
    q = quantize_base(copy.deepcopy(base), "int8")
    apply_lora(q, rank=4, alpha=8)
    adapters(q)
    save_adapter(q, tmp_path / "adapter")
    config, lora = read_adapter(tmp_path / "adapter")
    assert config["r"] == 4 and len(lora) == 3 * 7
    x = batch()["tokens"]
    with torch.no_grad():
        want = q(x)
        deq = dequantized(q, base)
        load_adapter(deq, tmp_path / "adapter")
        torch.testing.assert_close(deq(x), want, rtol=1e-4, atol=1e-4)
        load_adapter(base, tmp_path / "adapter")
        assert (base(x) - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(ValueError, match="quantized base"):
        merge_lora(q)


@pytest.fixture
def chat_run(tmp_path):
    tok = Tokenizer.from_gguf_vocab(gemma3_vocab())
    weights.save(random_model(CFG, seed=3), tmp_path / "base", tokenizer=tok)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"It is {i}."}]}) + "\n"
        for i in range(20)))
    assert cli.main(["data", "prepare", "--chat", str(tmp_path / "c.jsonl"), "--tokenizer", str(tmp_path / "base"),
                     "--out", str(tmp_path / "data"), "--seq-len", "48"]) == 0
    return tmp_path


def _sft(tmp, *extra):
    return ["sft", "--model", str(tmp / "base"), "--data", str(tmp / "data"), "--out", str(tmp / "run"),
            "--batch-size", "2", "--steps", "3", "--warmup", "1", "--lr", "2e-2", *extra]


def test_cli_sft_qlora_saves_an_adapter_that_applies_with_the_adapter_option(chat_run, capsys):
    assert cli.main(_sft(chat_run, "--lora-rank", "4", "--quantize-base", "int8")) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["adapter"] == str(chat_run / "run" / "adapter")
    log = [json.loads(line) for line in (chat_run / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"]
    # OUT/model is the unquantized base (bf16) with the adapter folded in: what --adapter gives
    from gemmakit import hub

    folded, _ = hub.load(str(chat_run / "base"), dtype=torch.bfloat16)
    load_adapter(folded, chat_run / "run" / "adapter")
    saved = weights.load(chat_run / "run" / "model", dtype=torch.bfloat16)
    for (n, a), (_, b) in zip(folded.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), n
    prompt = ["generate", "What is 3?", "--max-new-tokens", "4"]
    assert cli.main([*prompt, "--model", str(chat_run / "base"), "--adapter", str(chat_run / "run" / "adapter")]) == 0
    assert cli.main([*prompt, "--model", str(chat_run / "run" / "model")]) == 0
    # resume checks the quantization like any other setting
    assert cli.main([*_sft(chat_run, "--lora-rank", "4"), "--resume"]) == 1
    assert "quantize_base int8 -> None" in capsys.readouterr().err


def test_cli_quantize_base_needs_lora(chat_run, capsys):
    assert cli.main(_sft(chat_run, "--quantize-base", "int4")) == 1
    err = capsys.readouterr().err
    assert err == ("gemmakit: error: --quantize-base int4 needs --lora-rank: the quantized base is frozen, only "
                   "LoRA adapters train (QLoRA)\n")
    assert not (chat_run / "run").exists()


def test_stored_bytes_of_a_quantized_base():
    """A 6-layer model of the Gemma 3 270M's layer shapes (vocabulary cut to 16k so the test stays small):
    the int8 base takes ~1/2 of a bf16 base's bytes (1 byte per weight, a bf16 scale per row), int4 ~5/16
    (its bf16 scale and offset per group of 32 weights add 1/8 byte per weight to the 1/2); rank-8 fp32
    adapters add ~3% (1.4% with the real 262k-row vocabulary)."""
    config = get_config("gemma3-270m").replace(n_layers=6, vocab_size=16384,
                                               layer_types=get_config("gemma3-270m").layer_types[:6])
    model = build(config, "cpu", torch.bfloat16)
    model.init_weights()
    bf16 = stored_bytes(model)
    int8 = stored_bytes(quantize_base(copy.deepcopy(model), "int8"))
    int4 = stored_bytes(quantize_base(model, "int4"))
    assert 0.50 < int8 / bf16 < 0.51 and 0.31 < int4 / bf16 < 0.32, (int8 / bf16, int4 / bf16)
    apply_lora(model, rank=8)
    lora = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert lora < 0.03 * bf16
    assert all(isinstance(m.base, QuantLinear) for m in model.modules() if hasattr(m, "lora"))
