"""Reward models: the Bradley-Terry loss and gradient against hand-computed values, the layout and scores
of transformers' Gemma*ForSequenceClassification (both ways, 1e-5), a synthetic preference learned by a
tiny model, WARM, and `gemmakit reward pairs | train | score` end to end."""

import json
import random

import pytest
import torch

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab, write_gguf
from gemmakit import cli, weights
from gemmakit.engine import left_pad
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import reward as R
from gemmakit.train.trainer import TrainConfig, train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread avoids OpenMP's waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bradley_terry_loss_and_gradient_equal_hand_computed_values():
    chosen = torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 1.5, -0.2], dtype=torch.float64, requires_grad=True)
    loss = R.bradley_terry_loss(chosen, rejected)
    # -log sigmoid(d) for margins d = 1, -1, 0: log(1 + e^-1), log(1 + e), log 2; their mean
    want = (0.31326168751822286 + 1.3132616875182228 + 0.6931471805599453) / 3
    assert float(loss.detach()) == pytest.approx(want, abs=1e-12)
    loss.backward()
    # d/d chosen_i = -sigmoid(-d_i) / 3: sigmoid(-1) = 0.2689414213699951, sigmoid(1) = 0.7310585786300049
    want = torch.tensor([-0.2689414213699951, -0.7310585786300049, -0.5], dtype=torch.float64) / 3
    torch.testing.assert_close(chosen.grad, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected.grad, -want, rtol=0, atol=1e-12)
    assert R.pairwise_accuracy(chosen.detach(), rejected.detach()) == pytest.approx((1 + 0 + 0.5) / 3)


# -- transformers' layout ---------------------------------------------------------------------------------

def hf_classifier(generation):
    transformers = pytest.importorskip("transformers")
    from test_parity import hf_models

    _, config = hf_models()[generation]
    config.num_labels, config.pad_token_id = 1, 0
    cls = {1: transformers.GemmaForSequenceClassification, 2: transformers.Gemma2ForSequenceClassification,
           3: transformers.Gemma3TextForSequenceClassification}[generation]
    torch.manual_seed(generation)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.15)  # random norms: zero ones would hide bugs
    return model


SEQS = [[2, 5, 9, 11, 40, 7], [2, 8, 3], [2, 100, 101, 102, 103, 104, 105, 106, 107, 108]]  # longer than the window


def hf_scores(model, seqs=SEQS):
    """transformers' scores of a right-padded batch (it reads the rightmost non-pad token)."""
    length = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, 0]


@pytest.mark.parametrize("generation", [1, 2, 3])
def test_scores_equal_transformers_both_ways(generation, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = hf_classifier(generation)
    hf.save_pretrained(tmp_path / "hf")
    rm = R.load_reward_model(tmp_path / "hf")
    tokens, positions = left_pad(SEQS)
    with torch.no_grad():
        ours = rm.rewards(tokens, positions)
    ref = hf_scores(hf)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(R.score(rm, SEQS, batch_size=2), ref, rtol=1e-5, atol=1e-5)  # other padding
    # and back: gemmakit's save loads in transformers as the same class and scores the same
    R.save_reward_model(rm, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [R.ARCHITECTURES[generation]] and config["id2label"] == {"0": "LABEL_0"}
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(hf) and back.num_labels == 1
    torch.testing.assert_close(hf_scores(back), ref, rtol=1e-5, atol=1e-5)


def test_loading_a_language_model_as_a_reward_model_is_refused(tmp_path):
    weights.save(random_model(tiny_config(3)), tmp_path / "lm")
    with pytest.raises(ValueError, match="no score.weight: it is a language model"):
        R.load_reward_model(tmp_path / "lm")
    weights.save(random_model(tiny_config(1)), tmp_path / "two")  # then a score head of two labels in its weights
    state = {**R.from_language_model(random_model(tiny_config(1))).state_dict(), R.SCORE: torch.zeros(2, 64)}
    from gemmakit.weights import write_state

    write_state({k: v.contiguous() for k, v in state.items()}, tmp_path / "two")
    with pytest.raises(ValueError, match="one label"):
        R.load_reward_model(tmp_path / "two")


# -- learning a preference ------------------------------------------------------------------------------

def synthetic_pairs(n, seed):
    """The preferred reply mentions token 7 somewhere; the other is the same reply without it."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [2] + [rng.randrange(10, 128) for _ in range(4)]
        reply = [rng.randrange(10, 128) for _ in range(4)]
        chosen = list(reply)
        chosen[rng.randrange(4)] = 7
        pairs.append((prompt + chosen, prompt + reply))
    return pairs


def test_a_tiny_reward_model_learns_a_synthetic_preference(tmp_path):
    rm = R.from_language_model(random_model(tiny_config(3), seed=0))
    held_out = synthetic_pairs(100, seed=1)
    assert R.evaluate_pairs(rm, held_out)["accuracy"] == 0.5  # the new head scores everything 0: all ties
    cfg = TrainConfig(steps=50, batch_size=16, lr=3e-3, warmup=5, weight_decay=0.0, ckpt_every=1000)
    train(rm, R.PairData(synthetic_pairs(500, seed=0), 16, seed=0), cfg, tmp_path / "rm", loss_fn=R.pair_loss)
    result = R.evaluate_pairs(rm, held_out)
    assert result["accuracy"] > 0.95 and result["margin"] > 0, result


def test_pairs_are_split_by_prompt():
    pairs = [([i], [i + 1000], f"prompt {i % 50}") for i in range(500)]  # 10 pairs per prompt
    train_pairs, val = R.split_pairs(pairs, 0.2)
    assert 0 < len(val) < 250 and len(train_pairs) + len(val) == 500
    held = {f"prompt {c[0] % 50}" for c, _ in val}
    assert len(val) == 10 * len(held)  # every pair of a held-out prompt is held out, none of the others


# -- commands -------------------------------------------------------------------------------------------

V = 320  # tiny_vocab's byte and normal pieces need the room


@pytest.fixture
def tiny(tmp_path):
    """A tiny Gemma 3 GGUF with its tokenizer, prompts and a reward that prefers longer replies."""
    write_gguf(tmp_path / "tiny.gguf", random_model(tiny_config(3).replace(vocab_size=V)), tiny_vocab(V))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "answer": i + 1}) + "\n"
                                                   for i in range(12)))
    (tmp_path / "length.py").write_text("def length(record, reply):\n    return float(len(reply))\n")
    return tmp_path


def run(*argv):
    return cli.main([str(a) for a in argv])


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_pairs_train_score_and_warm(tiny, capsys):
    t = tiny
    assert run("reward", "pairs", "--model", t / "tiny.gguf", "--prompts", t / "prompts.jsonl", "--reward",
               f"python:{t / 'length.py'}:length", "--k", "3", "--max-new-tokens", "4", "--out", t / "pairs.jsonl") == 0
    made = last_json(capsys)
    pairs = [json.loads(ln) for ln in (t / "pairs.jsonl").read_text().splitlines()]
    assert made["pairs"] == len(pairs) > 5 and all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
    assert set(pairs[0]) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    common = ["--model", t / "tiny.gguf", "--data", t / "pairs.jsonl", "--steps", 3, "--batch-size", 2, "--lr", 1e-2,
              "--warmup", 1, "--val-fraction", 0.3]
    for seed in (0, 1):
        assert run("reward", "train", *common, "--seed", seed, "--lora-rank", 2, "--out", t / f"rm{seed}") == 0
        report = last_json(capsys)
        assert report["step"] == 3 and report["val_pairs"] > 0 and 0 <= report["val_accuracy"] <= 1
        assert R.is_reward_model(t / f"rm{seed}" / "model")
    assert Tokenizer.from_dir(t / "rm0" / "model").pieces == Tokenizer.from_gguf_vocab(tiny_vocab(V)).pieces
    # an earlier run is not overwritten; --resume with other settings is refused, naming them
    assert run("reward", "train", *common, "--lora-rank", 2, "--out", t / "rm0") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run("reward", "train", *common, "--lora-rank", 4, "--out", t / "rm0", "--resume") == 1
    assert "lora_rank 2 -> 4" in capsys.readouterr().err
    # score: pairwise accuracy on pairs, one score per completion otherwise
    assert run("reward", "score", "--model", t / "rm0" / "model", "--data", t / "pairs.jsonl") == 0
    assert last_json(capsys)["pairs"] == len(pairs)
    (t / "completions.jsonl").write_text(json.dumps({"prompt": "1 + 1 = ", "completion": "2"}) + "\n"
                                         + json.dumps({"prompt": "1 + 1 = ", "completion": "3"}) + "\n")
    assert run("reward", "score", "--model", t / "rm0" / "model", "--data", t / "completions.jsonl") == 0
    scores = [json.loads(ln)["score"] for ln in capsys.readouterr().out.splitlines()]
    rm, tok = R.load_scorer(str(t / "rm0" / "model"))
    want = R.score(rm, [tok.encode("1 + 1 = 2", add_bos=True), tok.encode("1 + 1 = 3", add_bos=True)]).tolist()
    assert scores == pytest.approx(want, abs=1e-6)
    # WARM: the average of the reward models' weights, itself a reward model
    assert run("warm", t / "rm0" / "model", t / "rm1" / "model", "--out", t / "warm") == 0
    merged = R.load_reward_model(t / "warm")
    a, b = R.load_reward_model(t / "rm0" / "model"), R.load_reward_model(t / "rm1" / "model")
    for name, w in merged.state_dict().items():
        torch.testing.assert_close(w, (a.state_dict()[name] + b.state_dict()[name]) / 2)
    assert run("warm", t / "rm0" / "model", t / "tiny.gguf", "--out", t / "warm2") == 1
    assert "not a reward model" in capsys.readouterr().err


def test_cli_errors_name_the_problem(tiny, capsys):
    t = tiny
    (t / "bad.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                                 + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    assert run("reward", "train", "--model", t / "tiny.gguf", "--data", t / "bad.jsonl", "--out", t / "rm") == 1
    assert 'bad.jsonl:2: a preference pair needs "chosen" and "rejected" (missing: rejected)' in capsys.readouterr().err
    assert not (t / "rm" / "model").exists()
    assert run("reward", "train", "--data", t / "missing.jsonl", "--out", t / "rm") == 1
    assert "no such JSONL file" in capsys.readouterr().err
    weights.save(random_model(tiny_config(3).replace(vocab_size=V)), t / "lm",
                 tokenizer=Tokenizer.from_gguf_vocab(tiny_vocab(V)))
    (t / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    assert run("reward", "score", "--model", t / "lm", "--data", t / "pairs.jsonl") == 1
    assert "it is a language model, not a reward model" in capsys.readouterr().err
    assert run("reward", "pairs", "--model", t / "tiny.gguf", "--prompts", t / "prompts.jsonl", "--reward", "nope",
               "--out", t / "p.jsonl") == 1
    assert "unknown --reward 'nope'" in capsys.readouterr().err
