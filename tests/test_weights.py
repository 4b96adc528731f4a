"""HF checkpoints: round trips, transformers reading what we write, sharding, and every error path
exercised with the actual bad file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_config
from gemmakit import weights
from gemmakit.weights import CheckpointError

TOKENS = torch.tensor([[5, 9, 17, 3, 99, 42, 7, 1, 64, 12], [2, 2, 8, 127, 0, 33, 45, 6, 6, 90]])


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip(tiny_model, tmp_path):
    out = weights.save(tiny_model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = weights.load(out)
    assert loaded.config == tiny_model.config.replace(name=str(out))
    assert_same_weights(loaded, tiny_model)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), logits(tiny_model), rtol=0, atol=0)


def test_save_bf16_load_fp32_and_bf16(tmp_path):
    model = random_model(tiny_config(3))
    weights.save(model, tmp_path / "c", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "c" / "model.safetensors").values())
    as_fp32 = weights.load(tmp_path / "c")
    for k, v in model.state_dict().items():
        assert torch.equal(as_fp32.state_dict()[k], v.bfloat16().float()), k
    as_bf16 = weights.load(tmp_path / "c", dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16


def test_transformers_loads_what_we_save(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    weights.save(tiny_model, tmp_path / "c")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(TOKENS).logits
    torch.testing.assert_close(logits(tiny_model), ref, rtol=1e-5, atol=1e-5)


def test_sharded_save_and_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model(tiny_config(2))
    out = weights.save(model, tmp_path / "c", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert_same_weights(weights.load(out), model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(model), hf(TOKENS).logits, rtol=1e-5, atol=1e-5)


# -- error paths -------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    """A valid tiny Gemma 3 checkpoint directory, and its tensors for tampering with."""
    out = weights.save(random_model(tiny_config(3)), tmp_path / "ckpt")
    return out, load_file(out / "model.safetensors")


def rewrite(out, tensors):
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_wrong_shape_are_listed_together(ckpt):
    out, t = ckpt
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    t["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    rewrite(out, t)
    with pytest.raises(CheckpointError) as e:
        weights.load(out)
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing model.layers.1.mlp.up_proj.weight (expected shape [96, 64])" in msg
    assert "unexpected model.layers.0.self_attn.extra.weight (shape [3])" in msg
    assert "wrong shape model.layers.2.self_attn.q_proj.weight: expected [64, 64], found [32, 64]" in msg


@pytest.mark.parametrize("tamper, words", [
    (lambda t: t.pop("model.norm.weight"), "missing model.norm.weight"),
    (lambda t: t.update({"vision_tower.x": torch.zeros(1)}), "unexpected vision_tower.x"),
    (lambda t: t.update({"model.embed_tokens.weight": torch.zeros(129, 64)}),
     "wrong shape model.embed_tokens.weight: expected [128, 64], found [129, 64]"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int8)}), "wrong dtype model.norm.weight"),
], ids=["missing", "unexpected", "shape", "dtype"])
def test_each_bad_tensor_is_named(ckpt, tamper, words):
    out, t = ckpt
    tamper(t)
    rewrite(out, t)
    with pytest.raises(CheckpointError, match="1 problems") as e:
        weights.load(out)
    assert words in str(e.value)


def test_tied_lm_head(ckpt):
    out, t = ckpt
    rewrite(out, {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    weights.load(out)  # a stored copy of the tied head is accepted...
    rewrite(out, {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        weights.load(out)  # ...a different head is a different model


@pytest.mark.parametrize("keep", [0.5, 0.9999, 4])
def test_truncated_safetensors_names_the_file(ckpt, keep):
    out, _ = ckpt
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        weights.load(out)


def test_not_safetensors_at_all(ckpt):
    out, _ = ckpt
    (out / "model.safetensors").write_bytes(b"\x80\x02}q\x00." * 100)  # a pickle is not read
    with pytest.raises(CheckpointError, match="model.safetensors"):
        weights.load_state_dict(out)


def test_missing_shard_is_named(tmp_path):
    out = weights.save(random_model(tiny_config(1)), tmp_path / "c", max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shards that do not exist: {victim.name}"):
        weights.load(out)


def test_index_that_disagrees_with_shards(tmp_path):
    out = weights.save(random_model(tiny_config(1)), tmp_path / "c", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    other = next(v for v in index["weight_map"].values() if v != index["weight_map"][first])
    index["weight_map"][first] = other
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"does not match its shards for: {first}"):
        weights.load(out)


def test_directory_without_config(ckpt):
    out, _ = ckpt
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt: no config.json in this directory"):
        weights.load(out)


def test_directory_without_weights(ckpt):
    out, _ = ckpt
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        weights.load(out)


def test_bad_config_json(ckpt):
    out, _ = ckpt
    (out / "config.json").write_text('{"model_type": "gemma3_text", ')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        weights.load(out)
    (out / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        weights.load(out)


def test_nonexistent_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        weights.load(tmp_path / "nope")


def test_float16_refused(ckpt):
    out, _ = ckpt
    with pytest.raises(ValueError, match="overflow"):
        weights.load(out, dtype=torch.float16)


# -- atomic writes -----------------------------------------------------------------------------

def test_failed_save_leaves_existing_checkpoint_intact(tmp_path, monkeypatch):
    old = random_model(tiny_config(1), seed=1)
    target = weights.save(old, tmp_path / "c", max_shard_bytes=40_000)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real_save_file, calls = weights.save_file, []

    def failing_save_file(*args, **kwargs):  # the disk fills up after the second shard
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(weights, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        weights.save(random_model(tiny_config(1), seed=2), target, max_shard_bytes=40_000)
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directory left behind
    assert_same_weights(weights.load(target), old)


def test_successful_save_replaces_existing_checkpoint(tmp_path):
    target = weights.save(random_model(tiny_config(1), seed=1), tmp_path / "c", max_shard_bytes=40_000)
    new = random_model(tiny_config(1), seed=2)
    weights.save(new, target)  # unsharded now: the old shards and index must be gone
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert_same_weights(weights.load(target), new)


def test_save_refuses_to_replace_a_non_checkpoint_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="non-empty directory without config.json"):
        weights.save(random_model(tiny_config(1)), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_save_refuses_meta_model(tmp_path):
    from gemmakit.model import build

    with pytest.raises(ValueError, match="meta device"):
        weights.save(build(tiny_config(1), "meta"), tmp_path / "c")
    assert not (tmp_path / "c").exists()


# -- the tokenizer, chat template and stop ids travel with every saved directory; ordinary permissions ---

def _tokenizer(generation):
    from gguf_files import tiny_vocab

    from chat_vocab import gemma3_vocab
    from gemmakit.tokenizer import Tokenizer

    return Tokenizer.from_gguf_vocab(gemma3_vocab() if generation == 3 else tiny_vocab(400, turn_ids=(106, 107)))


def test_saved_directory_is_0755_and_files_0644(tmp_path):
    import os
    import stat

    old = os.umask(0o077)  # a private umask must not make a shared model private (convert's rule too)
    try:
        out = weights.save(random_model(tiny_config(1)), tmp_path / "c", max_shard_bytes=40_000)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()} == \
        {p.name: "0o644" for p in out.iterdir()}


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_save_with_tokenizer_writes_template_and_stop_ids(generation, tmp_path):
    """tokenizer files, Google's chat template and generation_config.json: transformers formats and stops
    chats as gemmakit does, and gemmakit's own loader finds the tokenizer."""
    transformers = pytest.importorskip("transformers")
    from importlib import resources

    from gemmakit.hub import load
    from gemmakit.tokenizer import render_chat

    tok = _tokenizer(generation)
    model = random_model(tiny_config(generation).replace(vocab_size=400))
    out = weights.save(model, tmp_path / "c", tokenizer=tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.model",
                                                     "tokenizer_config.json"]
    template = resources.files("gemmakit").joinpath("chat_templates",
                                                    "gemma3.jinja" if generation == 3 else "gemma.jinja")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template.read_text()
    stops = [1, 106] if generation == 3 else [1, 107]
    assert json.loads((out / "generation_config.json").read_text()) == \
        {"bos_token_id": 2, "eos_token_id": stops, "pad_token_id": 0}
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == stops
    chat = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "the"}]
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    assert ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == render_chat(chat, generation)
    loaded, again = load(str(out))
    assert_same_weights(loaded, model)
    assert again.encode("the <start_of_turn>") == tok.encode("the <start_of_turn>")


def test_failed_tokenizer_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    from gemmakit.tokenizer import Tokenizer

    target = weights.save(random_model(tiny_config(1), seed=1), tmp_path / "c")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def failing_save(self, path, generation=None):
        (path / "tokenizer.model").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        weights.save(random_model(tiny_config(1), seed=2), target, tokenizer=_tokenizer(1))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_convert_writes_template_stop_ids_and_permissions(tmp_path):
    import stat

    from chat_vocab import gemma3_vocab
    from gguf_files import write_gguf
    from gemmakit.hub import convert
    from gemmakit.tokenizer import chat_template

    model = random_model(tiny_config(3).replace(vocab_size=400), seed=4)
    meta = {"gemma3.attention.scale": 24.0 ** -0.5, "gemma3.attention.sliding_window_pattern": 3}
    gguf = write_gguf(tmp_path / "tiny.gguf", model, gemma3_vocab(), extra_meta=meta)
    out = convert(gguf, tmp_path / "converted", progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == chat_template(3)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "tiny.gguf"]
