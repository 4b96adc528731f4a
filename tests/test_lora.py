"""LoRA: starts equal to the base model, trains only the adapters, merges into plain weights."""

import json

import pytest
import torch

from gemmakit.config import GLOBAL, LOCAL, get_config
from gemmakit.model import build
from gemmakit.train import data as D
from gemmakit.train import trainer as T
from gemmakit.train.lora import apply_lora, merge_lora

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
