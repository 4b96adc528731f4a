"""LoRA: starts equal to the base model, trains only the adapters, merges into plain weights."""

import json

import pytest
import torch

from gemmakit.config import GLOBAL, LOCAL, get_config
from gemmakit.model import build
from gemmakit.train import data as D
from gemmakit.train import trainer as T
from gemmakit.train.lora import TARGETS, apply_lora, merge_lora

CFG = get_config("gemma3-270m").replace(name="tiny", vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                        head_dim=16, intermediate_size=64, sliding_window=8, layer_types=(LOCAL, GLOBAL))


def model():
    torch.manual_seed(0)
    m = build(CFG, "cpu")
    m.init_weights(std=0.1)
    return m


def test_lora_trains_adapters_only_and_merges(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"all the world's a stage {i}"}) + "\n" for i in range(12)))
    D.prepare([src], lambda t: [b + 3 for b in t.encode()], tmp_path / "data", 300, val_fraction=0.0)
    base = model()
    m = model()
    keys = set(m.state_dict())
    x = torch.randint(0, 300, (2, 9))
    assert apply_lora(m, rank=4, alpha=8, generator=torch.Generator().manual_seed(1)) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(m(x), base(x))  # B = 0: the adapted model starts as the base model
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    res = T.train(m, D.PackedData(tmp_path / "data", "train", 16, 2), T.TrainConfig(
        steps=4, batch_size=2, seq_len=16, lr=1e-2, warmup=1, ckpt_every=100), tmp_path / "run")
    assert res["log"][-1]["loss"] < res["log"][0]["loss"]
    # frozen: the embedding and norms did not move; the adapted projections did
    torch.testing.assert_close(m.model.embed_tokens.weight, base.model.embed_tokens.weight, rtol=0, atol=0)
    with torch.no_grad():
        adapted = m(x)
        assert not torch.allclose(adapted, base(x))
    merge_lora(m)
    assert set(m.state_dict()) == keys  # plain parameter names again
    with torch.no_grad():
        torch.testing.assert_close(m(x), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model(), rank=0)


def test_cli_train_with_lora_saves_a_merged_model(tmp_path, capsys):
    from gemmakit import cli, weights
    from gemmakit.train.commands import new_model

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"what's in a name {i}"}) + "\n" for i in range(12)))
    D.prepare([src], lambda t: [b + 3 for b in t.encode()], tmp_path / "data", 300, val_fraction=0.2)
    student = tmp_path / "s.json"
    student.write_text(json.dumps({"base": "gemma3-270m", "vocab_size": 300, "d_model": 16, "n_layers": 2, "n_heads": 1,
                                   "n_kv_heads": 1, "head_dim": 8, "intermediate_size": 32, "sliding_window": 4}))
    assert cli.main(["train", "--model", str(student), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                     "--seq-len", "8", "--batch-size", "2", "--steps", "3", "--warmup", "1", "--lr", "1e-2",
                     "--lora-rank", "2"]) == 0
    saved = weights.load(tmp_path / "r" / "model")
    init, _ = new_model(str(student), 0)
    # the embedding was frozen; the adapted projections were merged into plain weights
    assert torch.equal(saved.model.embed_tokens.weight, init.model.embed_tokens.weight)
    assert not torch.equal(saved.model.layers[0].self_attn.q_proj.weight, init.model.layers[0].self_attn.q_proj.weight)


# -- adapters in PEFT's format (gemmakit.adapters) -------------------------------------------------------

def _hf_and_peft():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return transformers, peft


def _random_lora(m, seed=5):
    """LoRA with B random too (B = 0 at init would make every adapter look like the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2, generator=g)


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_gemmakit_adapter_loads_in_peft_with_the_same_logits(tmp_path, generation):
    """An adapter trained in gemmakit, saved in PEFT's format, applied by peft.PeftModel.from_pretrained to
    transformers' model of the same base: the logits equal gemmakit's with the adapter (fp32, 1e-5)."""
    from conftest import random_model, tiny_config
    from gemmakit import weights
    from gemmakit.train.lora import save_adapter

    transformers, peft = _hf_and_peft()
    base = random_model(tiny_config(generation), seed=generation)
    weights.save(base, tmp_path / "base")
    x = torch.randint(0, base.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(x)
    apply_lora(base, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    _random_lora(base)
    save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = base(x)
        torch.testing.assert_close(adapted(x).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain, want, atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_gemmakit_with_the_same_logits(tmp_path, rslora):
    """An adapter made with peft on a tiny transformers Gemma 3, loaded by gemmakit onto the same base
    (`load_adapter` folds it into the weights): the logits equal peft's (fp32, 1e-5)."""
    from test_parity import hf_models
    from gemmakit import weights
    from gemmakit.adapters import load_adapter

    transformers, peft = _hf_and_peft()
    cls, config = hf_models()[3]
    torch.manual_seed(0)
    hf = cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.15)
    hf.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False,
                           use_rslora=rslora)
    adapted = peft.get_peft_model(hf, lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    ours = weights.load(tmp_path / "base")
    x = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = ours(x)
        assert load_adapter(ours, tmp_path / "adapter") == config.num_hidden_layers * len(TARGETS)
        want = adapted(x).logits
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain, want, atol=1e-3)


def test_load_adapter_names_what_does_not_fit(tmp_path):
    from conftest import random_model, tiny_config
    from safetensors.torch import save_file

    from gemmakit.adapters import load_adapter
    from gemmakit.train.lora import save_adapter

    m = random_model(tiny_config(3))
    apply_lora(m, rank=2, alpha=4)
    save_adapter(m, tmp_path / "a")
    other = random_model(tiny_config(3).replace(intermediate_size=48))
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj: adapter is for a \[96, 64\] weight, "
                                         r"the model's is \[48, 64\]"):
        load_adapter(other, tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing changed
    cfg = tmp_path / "a" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(random_model(tiny_config(3)), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              tmp_path / "b" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.9\.self_attn\.q_proj: no such Linear layer"):
        load_adapter(random_model(tiny_config(3)), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(m, tmp_path)


def test_cli_merge_adapter_and_lora_training_write_the_adapter(tmp_path, capsys):
    """`gemmakit train --lora-rank` leaves OUT/adapter (PEFT) beside the merged OUT/model; `gemmakit
    merge-adapter` folds that adapter into the base and gives OUT/model's weights."""
    from conftest import random_model, tiny_config
    from gguf_files import tiny_vocab
    from gemmakit import cli, weights
    from gemmakit.tokenizer import Tokenizer

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"to be or not {i}"}) + "\n" for i in range(12)))
    D.prepare([src], lambda t: [b + 3 for b in t.encode()], tmp_path / "data", 300, val_fraction=0.0)
    tok = Tokenizer.from_gguf_vocab(tiny_vocab(300))
    weights.save(random_model(tiny_config(3).replace(vocab_size=300)), tmp_path / "base", tokenizer=tok)
    assert cli.main(["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--out",
                     str(tmp_path / "r"), "--seq-len", "8", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                     "--lr", "1e-2", "--lora-rank", "2"]) == 0
    assert (tmp_path / "r" / "adapter" / "adapter_model.safetensors").is_file()
    assert cli.main(["merge-adapter", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "r" / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["adapted_layers"] == 3 * 7
    merged, trained = weights.load(tmp_path / "merged"), weights.load(tmp_path / "r" / "model")
    for (k, a), b in zip(merged.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


def test_lora_backward_forms_no_weight_gradient_of_the_base():
    """The update is added to the layers' outputs, so the backward computes the inputs' gradients and the
    thin adapters' only: its matrix products cost about the forward's (a third of a step saved against
    forming dL/dW for every frozen weight, which a weight-space update W + B A would need)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = model()
    apply_lora(m, rank=4, alpha=8)
    x = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as forward:
        h = m.hidden(x)
    with FlopCounterMode(display=False) as backward:
        h.sum().backward()
    assert backward.get_total_flops() < 1.1 * forward.get_total_flops()
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
