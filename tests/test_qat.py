"""Quantization-aware training (gemmakit.train.qat): the fake-quantized forward is the PTQ model's, the
straight-through gradient is the identity, a short run lowers the KL to the original below PTQ's,
`gemmakit qat` resumes exactly, its outputs load (HF directory, Q4_0 GGUF with the trained blocks), and
bad input is a one-line error."""

from __future__ import annotations

import copy
import json
import os
import signal

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab, write_gguf
from gemmakit import cli, hub, quant
from gemmakit.gguf import load_gguf
from gemmakit import quant
from gemmakit.quant import QUANTIZED, Q4_0Linear, QuantEmbedding, fake_quantize, quantize, quantize_q4_0
from gemmakit.train import data as D
from gemmakit.train import qat as Q
from gemmakit.train import trainer as T
from gemmakit.train.losses import cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

V = 320  # rows of the tiny models: tiny_vocab needs room for its byte and normal pieces
FORMATS = ("q4_0", "int4-channel", "fp8")
TEXT = ["this is the thing", "the hat is on", "a thesis on the sea", "this is a test of the tokens"]


def tiny(seed: int = 0, generation: int = 3):
    return random_model(tiny_config(generation).replace(vocab_size=V), seed=seed)


def kl_to(teacher, model, tokens) -> float:
    """Mean KL(teacher || model) per position of `tokens` [B, T], in nats."""
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher(tokens).float(), -1)
        logp = torch.log_softmax(model(tokens).float(), -1)
    return float((logp_t.exp() * (logp_t - logp)).sum(-1).mean())


# -- the fake-quantized model ---------------------------------------------------------------------------

def weights_only(ptq):
    """The PTQ model's products on its dequantized weights: q4_0 also rounds activations to Q8_0 blocks
    (as llama.cpp), which QAT does not model; its weights are what QAT trains."""
    emb = ptq.model.embed_tokens
    if isinstance(emb, QuantEmbedding) and isinstance(emb.table, Q4_0Linear):
        ptq.model.embed_tokens = torch.nn.Embedding.from_pretrained(emb.table.dequantize())
    for parent in list(ptq.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Q4_0Linear):
                setattr(parent, name, quant._dequantized(child))
    return ptq


@pytest.mark.parametrize("generation", [2, 3])
@pytest.mark.parametrize("mode", Q.FORMATS)
def test_fake_quantized_forward_equals_the_ptq_model(mode, generation):
    model = tiny(generation=generation)
    ptq = quantize(copy.deepcopy(model), mode)
    qat = Q.prepare_qat(copy.deepcopy(model), mode)
    # exactly the tensors PTQ quantizes: every decoder Linear and the tied embedding, nothing else
    quantized = {n for n, m in ptq.named_modules() if isinstance(m, QUANTIZED) and not n.endswith(".table")}
    quantized |= {n for n, m in ptq.named_modules() if isinstance(m, QuantEmbedding)}
    assert {n for n, m in qat.named_modules() if isinstance(m, Q._FakeQuant)} == quantized
    assert qat.state_dict().keys() == model.state_dict().keys()  # same names: checkpoints, saving, quantize()
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = weights_only(copy.deepcopy(ptq))(tokens)
        torch.testing.assert_close(qat(tokens), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qat(tokens).detach(), ref, rtol=1e-5, atol=1e-5)  # the training path (autograd)
    qat.eval()
    with torch.no_grad():  # the evaluation path (one rounding per weight, cached)
        torch.testing.assert_close(qat(tokens), ref, rtol=1e-5, atol=1e-5)
    # the trained weights quantized by PTQ give the same model again
    plain = Q.remove_qat(qat)
    assert all(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in plain.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    with torch.no_grad():
        torch.testing.assert_close(weights_only(quantize(plain, mode))(tokens), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", Q.FORMATS)
def test_straight_through_gradient_is_the_identity(mode):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(8, 64, generator=g) * 0.05).requires_grad_()
    y = Q.fake_quantized(w, mode)
    assert torch.equal(y.detach(), fake_quantize(w.detach(), mode))
    assert not torch.equal(y.detach(), w.detach())  # it does round
    c = torch.randn(8, 64, generator=g)
    y.backward(c)
    assert torch.equal(w.grad, c)


@pytest.mark.parametrize("mode", FORMATS)
def test_qat_gradients_are_the_quantized_models_gradients(mode):
    """Through the whole model, the tied embedding's two uses and the chunked LM head with the step cache:
    each float weight gets the gradient the plain model has at the fake-quantized weights."""
    model = tiny()
    at_grid = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in at_grid.named_parameters():
            if p.ndim == 2:
                p.copy_(fake_quantize(p, mode))
    qat = Q.prepare_qat(model, mode)
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(tokens, -1, 1)
    with Q.step_cache(qat):
        cross_entropy(qat, qat.hidden(tokens), targets, chunk=7).backward()  # 3 chunks share one rounding
    cross_entropy(at_grid, at_grid.hidden(tokens), targets, chunk=7).backward()
    expected = dict(at_grid.named_parameters())
    for name, p in qat.named_parameters():
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputed in the backward (outside the step's cache), the blocks round their weights again."""
    from gemmakit.train.parallel import apply_activation_checkpointing

    teacher = tiny(seed=1)
    tokens = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(4))
    batch = {"tokens": tokens, "targets": torch.roll(tokens, -1, 1)}
    grads = []
    for checkpointing in (False, True):
        model = Q.prepare_qat(copy.deepcopy(teacher).requires_grad_(True), "q4_0")  # qat_loss froze the teacher
        if checkpointing:
            apply_activation_checkpointing(model)
        Q.qat_loss(teacher, "full", chunk=5)(model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-8, msg=name)


def test_weights_on_a_shared_grid_start_off_the_rounding_boundaries():
    """Weights dequantized from Q5_0 (the real 270M's q/k/gate/up) re-rounded to Q4_0: every odd Q5_0 level
    is a Q4_0 rounding boundary. Left there, the first update, however small, moves all of them across at
    once; prepare_qat starts them inside their cells, with the same PTQ rounding."""
    from gguf.quants import dequantize, quantize as gguf_quantize

    q5 = GGMLQuantizationType.Q5_0
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(dequantize(gguf_quantize(p.numpy(), q5), q5)).reshape(p.shape))
    original = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}

    def flipped_by_a_nudge(w):  # fraction of weights whose rounding a coherent +1e-6 changes
        return float((fake_quantize(w + 1e-6, "q4_0") != fake_quantize(w, "q4_0")).float().mean())

    assert np.mean([flipped_by_a_nudge(w) for w in original.values()]) > 0.2
    Q.prepare_qat(model, "q4_0")
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert torch.equal(fake_quantize(p.detach(), "q4_0"), fake_quantize(original[name], "q4_0")), name
            assert flipped_by_a_nudge(p.detach()) == 0, name


def test_cached_rounding_follows_the_weights(monkeypatch):
    """One rounding per weight per loss; after an optimizer step (fused AdamW does not bump the weights'
    version) and in an evaluation after it, the new weights are used."""
    calls = []
    real = Q.fake_quantize
    monkeypatch.setattr(Q, "fake_quantize", lambda w, mode: calls.append(w.shape) or real(w, mode))
    qat = Q.prepare_qat(tiny(), "q4_0")
    wrapped = sum(isinstance(m, Q._FakeQuant) for m in qat.modules())
    calls.clear()
    tokens = torch.randint(0, V, (1, 8))
    opt = torch.optim.AdamW(qat.parameters(), lr=1e-2, fused=True)
    with Q.step_cache(qat):
        cross_entropy(qat, qat.hidden(tokens), tokens, chunk=3).backward()
    assert len(calls) == wrapped
    before = {n: fake_quantize(p.detach(), "q4_0") for n, p in qat.named_parameters() if p.ndim == 2}
    opt.step()
    qat.eval()
    with torch.no_grad():
        out = qat(tokens)
        assert torch.equal(qat(tokens), out)
    emb = qat.model.embed_tokens
    assert not torch.equal(emb.fake_weight(), before["model.embed_tokens.weight"])
    # the weights the evaluation used are the quantized model's (whose q4_0 products also round activations)
    plain = Q.remove_qat(copy.deepcopy(qat))
    quantized = quantize(copy.deepcopy(plain), "q4_0")
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if p.ndim == 2:
                p.copy_(fake_quantize(p, "q4_0"))
        torch.testing.assert_close(out, plain(tokens), rtol=1e-5, atol=1e-5)
    lm = quantized.model
    assert torch.equal(lm.embed_tokens.table.dequantize(), plain.model.embed_tokens.weight)
    assert torch.equal(lm.layers[0].mlp.up_proj.dequantize(), plain.model.layers[0].mlp.up_proj.weight)


def test_unsupported_widths_and_models_are_refused_before_training():
    model = random_model(tiny_config(3).replace(vocab_size=V, intermediate_size=80))  # down_proj rows of 80
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.prepare_qat(model, "q4_0")
    assert all(type(m) is not Q.FakeQuantLinear for m in model.modules())  # nothing half-wrapped
    with pytest.raises(ValueError, match="unknown quantization format 'q5_0'"):
        Q.prepare_qat(tiny(), "q5_0")
    with pytest.raises(ValueError, match="float model"):
        Q.prepare_qat(quantize(tiny(), "int8"), "q4_0")


# -- training -------------------------------------------------------------------------------------------

def _encode(text: str) -> list[int]:
    return [b % (V - 3) + 3 for b in text.encode()]


@pytest.mark.parametrize("mode,objective", [("q4_0", "full"), ("int4-channel", "sampled"), ("fp8", "full")])
def test_a_short_qat_run_lowers_the_kl_below_ptq(tmp_path, mode, objective):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i in range(8) for t in TEXT))
    D.prepare([src], _encode, tmp_path / "data", V, val_fraction=0.0)
    held_out = torch.tensor([_encode("the sea is a hat on this thesis, a test 9")])  # the same kind of text
    teacher = tiny(seed=3)
    ptq_kl = kl_to(teacher, weights_only(quantize(copy.deepcopy(teacher), mode)), held_out)
    model = Q.prepare_qat(copy.deepcopy(teacher), mode)
    assert kl_to(teacher, model, held_out) == pytest.approx(ptq_kl, rel=1e-4)  # step 0 is PTQ
    cfg = T.TrainConfig(steps=30, batch_size=4, seq_len=16, lr=3e-4, warmup=3, weight_decay=0.0, ckpt_every=100)
    res = T.train(model, D.PackedData(tmp_path / "data", "train", 16, 4), cfg, tmp_path / "run",
                  loss_fn=Q.qat_loss(teacher, objective, k=256, chunk=32))
    losses = [r["loss"] for r in res["log"]]
    assert len(set(losses)) == len(losses) and np.mean(losses[-5:]) < np.mean(losses[:5])
    qat_kl = kl_to(teacher, weights_only(quantize(Q.remove_qat(model), mode)), held_out)  # saved, quantized by PTQ
    assert qat_kl < 0.7 * ptq_kl, (ptq_kl, qat_kl)  # measured: 0.38, 0.34 and 0.50 of PTQ's


# -- `gemmakit qat` ---------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path):
    """A tiny Gemma 3 GGUF with its tokenizer, and data prepared with it."""
    write_gguf(tmp_path / "tiny.gguf", tiny(seed=5), tiny_vocab(V))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i in range(6) for t in TEXT))
    assert cli.main(["data", "prepare", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "data"),
                     "--tokenizer", str(tmp_path / "tiny.gguf")]) == 0
    return tmp_path


def qat_cli(tmp, out, *extra):
    return cli.main(["qat", "--model", str(tmp / "tiny.gguf"), "--data", str(tmp / "data"), "--out", str(tmp / out),
                     "--seq-len", "8", "--batch-size", "2", "--steps", "4", "--warmup", "1", "--lr", "1e-3",
                     "--chunk", "5", *extra])


def _log(path):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (path / T.LOG).read_text().splitlines()]


@pytest.mark.parametrize("objective", ["full", "sampled"])
def test_resume_after_a_stop_gives_the_same_log(run_dir, monkeypatch, capsys, objective):
    extra = ("--format", "q4_0", "--objective", objective, "--k", "16", "--ckpt-every", "1")
    assert qat_cli(run_dir, "a", *extra) == 0
    real = Q.qat_loss

    def interrupted_at_step_2(*args, **kwargs):
        inner, calls = real(*args, **kwargs), [0]

        def f(model, batch):
            calls[0] += 1
            if calls[0] == 2:  # the step finishes, a checkpoint is written, the command returns
                os.kill(os.getpid(), signal.SIGINT)
            return inner(model, batch)
        return f

    monkeypatch.setattr(Q, "qat_loss", interrupted_at_step_2)
    assert qat_cli(run_dir, "b", *extra) == 0
    assert "stopped by SIGINT at step 2" in capsys.readouterr().err and not (run_dir / "b" / "model").exists()
    monkeypatch.setattr(Q, "qat_loss", real)
    assert qat_cli(run_dir, "b", *extra, "--resume") == 0
    a, b = _log(run_dir / "a"), _log(run_dir / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a == b
    wa, _ = hub.load(str(run_dir / "a" / "model"))
    wb, _ = hub.load(str(run_dir / "b" / "model"))
    for (k, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(x, y), k


def test_outputs_load_and_the_gguf_holds_the_trained_blocks(run_dir, capsys):
    assert qat_cli(run_dir, "out", "--format", "q4_0") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 4 and report["format"] == "q4_0" and report["kl"] > 0
    model, tok = hub.load(report["model"])  # the HF directory: the trained float weights (fp32) and tokenizer
    original, _ = hub.load(str(run_dir / "tiny.gguf"))
    assert tok.pieces == tiny_vocab(V).tokens and next(model.parameters()).dtype == torch.float32
    assert not torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)  # it trained
    # every matrix of the GGUF, the embedding included, is Q4_0 holding exactly the trained weights' blocks
    reader = GGUFReader(report["gguf"])
    blocks = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    from gemmakit.export import gguf_name

    for k, w in state.items():
        t = blocks[gguf_name(k, 3)]
        if w.ndim < 2:
            assert t.tensor_type == GGMLQuantizationType.F32
            continue
        assert t.tensor_type == GGMLQuantizationType.Q4_0, k
        packed, d, _ = quantize_q4_0(w)
        expected = np.concatenate([d.numpy().astype(np.float16)[..., None].view(np.uint8),
                                   packed.numpy()], axis=-1).reshape(w.shape[0], -1)
        assert np.array_equal(np.asarray(t.data).reshape(w.shape[0], -1), expected), k
    # loaded back, the GGUF is the fake-quantized model that trained (dequantized weights equal)
    _, gguf_state, _ = load_gguf(report["gguf"], progress=False)
    for k, w in state.items():
        if w.ndim == 2:
            assert torch.equal(gguf_state[k], fake_quantize(w, "q4_0")), k
    tokens = torch.randint(3, V, (1, 9))
    with torch.no_grad():
        trained = Q.prepare_qat(copy.deepcopy(model), "q4_0")(tokens)
        torch.testing.assert_close(hub.load(report["gguf"])[0](tokens), trained, rtol=1e-5, atol=1e-5)


def test_formats_without_a_gguf_write_the_hf_directory(run_dir, capsys):
    assert qat_cli(run_dir, "fp8", "--format", "fp8", "--steps", "1", "--activation-checkpointing") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "gguf" not in report and "--quantize fp8" in report["run"]
    assert not list((run_dir / "fp8").glob("*.gguf"))
    assert cli.main(["generate", "this is", "--model", report["model"], "--quantize", "fp8", "--max-new-tokens", "2",
                     "--no-compile"]) == 0


@pytest.mark.parametrize("args,message", [
    (["--format", "q5_k"], "unknown --format 'q5_k'; choose one of int8, int4, int4-channel, q4_0, q8_0, fp8"),
    (["--format", "w8a8"], "--format w8a8 cannot be trained (its activations are rounded at run time)"),
    (["--format", "q4_0", "--objective", "reverse"], "unknown --objective 'reverse'"),
    (["--format", "q4_0", "--data", "MISSING"], "not a prepared data directory"),
    (["--format", "q4_0", "--objective", "sampled", "--k", "0"], "--k 0 must be in [1, 320]"),
])
def test_bad_input_is_a_one_line_error(run_dir, capsys, args, message):
    if "MISSING" in args:
        args[args.index("MISSING")] = str(run_dir / "missing")
        args = ["--model", str(run_dir / "tiny.gguf"), "--out", str(run_dir / "o"), "--steps", "1"] + args
        assert cli.main(["qat", *args]) == 1
    else:
        assert qat_cli(run_dir, "o", *args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gemmakit: error: ") and message in err[0], err
    assert not (run_dir / "o").exists()  # nothing written


def test_help_gives_every_default():
    import argparse

    subs = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for a in subs["qat"]._actions:
        if not a.option_strings or a.required or a.help == argparse.SUPPRESS or a.nargs == 0:
            continue  # required options, --help/--debug and on/off switches
        assert "default" in a.help and (a.default in (None, argparse.SUPPRESS) or str(a.default) in a.help), a.help
