"""From a gemmakit training run to vLLM: `OUT/model` is a Hugging Face directory that transformers loads as
it is, with gemmakit's logits (fp32, 1e-5), its chat template and its stop ids -- what `vllm serve OUT/model`
reads (config.json, model.safetensors, tokenizer files, generation_config.json). vLLM itself is not
installed in the test environment (its CPU wheel pins another torch), so transformers stands in for it:
both load the same architectures from the same files."""

import json

import pytest
import torch

from chat_vocab import SIZE, gemma3_vocab
from conftest import random_model, tiny_config
from gemmakit import cli, weights
from gemmakit.tokenizer import Tokenizer, encode_chat

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# Architectures vLLM serves for Gemma (vllm/model_executor/models/registry.py).
VLLM_GEMMA = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"}
CHAT = [{"role": "user", "content": "What is 7?"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Gemma 3 base with the chat tokenizer, plain and chat data prepared from it, and one
    `gemmakit train` / `sft` run through the CLI per kind of training: {name: OUT/model}."""
    tmp = tmp_path_factory.mktemp("vllm")
    base = tmp / "base"
    tok = Tokenizer.from_gguf_vocab(gemma3_vocab())
    weights.save(random_model(tiny_config(3).replace(vocab_size=SIZE, max_seq_len=256), seed=3), base, tokenizer=tok)
    (tmp / "text.jsonl").write_text("".join(json.dumps({"text": f"the {i} is on the hat"}) + "\n" for i in range(40)))
    chats = [[{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"It is the {i}."}]
             for i in range(30)]
    (tmp / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    assert cli.main(["data", "prepare", str(tmp / "text.jsonl"), "--tokenizer", str(base), "--out", str(tmp / "plain")]) == 0
    assert cli.main(["data", "prepare", "--chat", str(tmp / "chats.jsonl"), "--tokenizer", str(base), "--seq-len", "64",
                     "--out", str(tmp / "chat")]) == 0
    common = ["--model", str(base), "--steps", "2", "--warmup", "1", "--lr", "1e-2", "--batch-size", "2"]
    kinds = {"train": ["train", "--data", str(tmp / "plain"), "--seq-len", "16"],
             "train-lora": ["train", "--data", str(tmp / "plain"), "--seq-len", "16", "--lora-rank", "2"],
             "train-qlora": ["train", "--data", str(tmp / "plain"), "--seq-len", "16", "--lora-rank", "2",
                             "--quantize-base", "int8"],
             "sft-lora": ["sft", "--data", str(tmp / "chat"), "--lora-rank", "2"]}
    out = {"base": base}
    for name, argv in kinds.items():
        assert cli.main([*argv, *common, "--out", str(tmp / name)]) == 0, name
        out[name] = tmp / name / "model"
    return out


@pytest.mark.parametrize("name", ["train", "train-lora", "train-qlora", "sft-lora"])
def test_transformers_loads_the_trained_directory_with_gemmakits_logits(runs, name):
    model_dir = runs[name]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"][0] in VLLM_GEMMA
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ours = weights.load(model_dir, dtype=torch.float32).eval()
    # The run trained: its weights are not the base's.
    base = weights.load(runs["base"], dtype=torch.float32)
    assert not torch.equal(ours.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    # Prompts as vLLM's chat endpoint renders them: the directory's own template, through transformers.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == encode_chat(Tokenizer.from_dir(model_dir), CHAT, 3)  # what gemmakit chat / serve feed the model
    tokens = torch.tensor([ids, list(range(2, 2 + len(ids)))])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    # A reply stops where gemmakit's does: generation_config.json lists <end_of_turn> (vLLM reads it).
    stops = transformers.GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    assert hf_tok.convert_tokens_to_ids("<end_of_turn>") in (stops if isinstance(stops, list) else [stops])
