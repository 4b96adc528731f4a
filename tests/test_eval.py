"""`gemmakit eval` (issue 15 item 4): the lm-eval adapter against lm-eval's own HF model (HFLM, transformers)
on one tiny random Gemma 3 and the local tasks of tests/data/lm_eval (multiple choice, generation, rolling
perplexity), then the command."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab
from gemmakit import weights
from gemmakit.cli import main
from gemmakit.hub import load
from gemmakit.tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.models.huggingface import HFLM  # noqa: E402

from gemmakit.eval.lm_eval_model import GemmaLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"
VOCAB = 300


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF directory of a tiny random Gemma 3 that transformers loads, TaskManager over the local tasks);
    the working directory is the repository root, where the task YAMLs' data_files are."""
    from lm_eval.tasks import TaskManager

    path = tmp_path_factory.mktemp("eval") / "tiny-gemma3"
    model = random_model(tiny_config(3).replace(vocab_size=VOCAB, max_seq_len=256), seed=3)
    # With the tokenizer: tokenizer_config.json gets the chat template, generation_config.json the stop ids.
    weights.save(model, path, tokenizer=Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB)))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield path, TaskManager(include_path=str(TASKS), include_defaults=False)  # local tasks only: fast


def _run(lm, setup, tasks, **kw):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=setup[1], log_samples=True,
                                   bootstrap_iters=0, **kw)


def _responses(results, task):
    """Per document, the model's raw answers: [(logprob, greedy)] per choice, [text] or [logprob]."""
    return [[r[0] for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _close(ours, theirs, tol=1e-4):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            x, y = (x, None) if not isinstance(x, tuple) else x, (y, None) if not isinstance(y, tuple) else y
            assert math.isclose(x[0], y[0], rel_tol=0, abs_tol=tol), (x, y)
            assert x[1] == y[1]


def test_loglikelihood_and_generation_match_hflm(setup):
    """Multiple choice (32 loglikelihoods: sum of log-probs and is-greedy) to 1e-4, and the greedy generations
    (stopped at "\\n") identical, against HFLM reading the same checkpoint."""
    model, tok = load(str(setup[0]))
    ours = _run(GemmaLM(model, tok, batch_size=3), setup, ["gemmakit_mc", "gemmakit_gen"])
    hf = HFLM(pretrained=str(setup[0]), device="cpu", batch_size=3)
    # A random model emits stray UTF-8 bytes, which transformers' decoder replaces otherwise than
    # SentencePiece's: HFLM's generated ids are decoded by our tokenizer, so the texts compare the ids.
    hf.tok_decode = lambda ids, skip_special_tokens=True: tok.decode([ids] if isinstance(ids, int) else list(ids),
                                                                      skip_special=skip_special_tokens)
    theirs = _run(hf, setup, ["gemmakit_mc", "gemmakit_gen"])
    _close(_responses(ours, "gemmakit_mc"), _responses(theirs, "gemmakit_mc"))
    assert _responses(ours, "gemmakit_gen") == _responses(theirs, "gemmakit_gen")
    assert ours["results"]["gemmakit_mc"]["acc,none"] == theirs["results"]["gemmakit_mc"]["acc,none"]
    assert len(_responses(ours, "gemmakit_mc")) == 8 and len(_responses(ours, "gemmakit_gen")) == 6


def test_chat_template_and_few_shot_match_hflm(setup):
    """--apply-chat-template with a system prompt and 2 few-shot examples as turns: the prompts transformers
    renders from the saved template, scored the same."""
    model, tok = load(str(setup[0]))
    kw = dict(apply_chat_template=True, num_fewshot=2, system_instruction="Answer with one word.", limit=4)
    lm = GemmaLM(model, tok, batch_size=4)
    ours = _run(lm, setup, ["gemmakit_mc"], **kw)
    hf = HFLM(pretrained=str(setup[0]), device="cpu", batch_size=4)
    theirs = _run(hf, setup, ["gemmakit_mc"], **kw)
    _close(_responses(ours, "gemmakit_mc"), _responses(theirs, "gemmakit_mc"))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert lm.apply_chat_template(chat) == hf.apply_chat_template(chat)
    assert lm.apply_chat_template(chat).startswith("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n")
    prefill = chat + [{"role": "assistant", "content": "Answer:"}]  # an open model turn, to be continued
    assert lm.apply_chat_template(prefill, add_generation_prompt=False) == \
        hf.apply_chat_template(prefill, add_generation_prompt=False)


def test_rolling_loglikelihood_matches_hflm_with_one_bos(setup):
    """Perplexity task in windows of 64 tokens (each text spans several): equal to HFLM with
    add_bos_token=False, whose windows are <bos> + text as ours; HFLM's default scores <bos><bos> + text."""
    model, tok = load(str(setup[0]))
    ours = _run(GemmaLM(model, tok, batch_size=2, max_length=64), setup, ["gemmakit_ppl"])
    hf = HFLM(pretrained=str(setup[0]), device="cpu", batch_size=2, max_length=64, add_bos_token=False)
    theirs = _run(hf, setup, ["gemmakit_ppl"])
    _close(_responses(ours, "gemmakit_ppl"), _responses(theirs, "gemmakit_ppl"))
    texts = [json.loads(line)["text"] for line in (TASKS / "text.jsonl").read_text().splitlines()]
    assert all(len(tok.encode(t, add_bos=False)) > 64 for t in texts)  # several windows each
    default = _run(HFLM(pretrained=str(setup[0]), device="cpu", batch_size=2, max_length=64), setup, ["gemmakit_ppl"])
    assert _responses(default, "gemmakit_ppl")[0][0] < _responses(ours, "gemmakit_ppl")[0][0] - 1


def test_scores_do_not_depend_on_the_batch(setup):
    """Left padding and chunks through the cache: batch 1, batch 5 and chunks of 7 tokens agree."""
    import gemmakit.eval.lm_eval_model as M

    model, tok = load(str(setup[0]))
    g = torch.Generator().manual_seed(0)
    reqs = [(None, torch.randint(7, VOCAB, (n,), generator=g).tolist(), torch.randint(7, VOCAB, (c,), generator=g).tolist())
            for n, c in [(3, 1), (40, 5), (17, 17), (1, 2), (25, 3)]]
    one = GemmaLM(model, tok, batch_size=1)._loglikelihood_tokens(reqs, disable_tqdm=True)
    five = GemmaLM(model, tok, batch_size=5)._loglikelihood_tokens(reqs, disable_tqdm=True)
    chunk = M.CHUNK
    try:
        M.CHUNK = 7
        small = GemmaLM(model, tok, batch_size=5)._loglikelihood_tokens(reqs, disable_tqdm=True)
    finally:
        M.CHUNK = chunk
    for a, b, c in zip(one, five, small):
        assert abs(a[0] - b[0]) < 1e-4 and abs(a[0] - c[0]) < 1e-4 and a[1] == b[1] == c[1]
    # The reference: one plain forward per request.
    for (_, ctx, cont), (logp, _) in zip(reqs, one):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids[:, :-1])[0, -len(cont):], -1)
        assert abs(lp.gather(1, torch.tensor(cont)[:, None]).sum().item() - logp) < 1e-4


def test_eval_command(setup, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(setup[0]), "--tasks", "gemmakit_mc,gemmakit_gen", "--include-path", str(TASKS),
            "--limit", "3", "--batch-size", "2", "--output-path", str(out), "--no-compile"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "gemmakit_mc" in table and "gemmakit_gen" in table and "exact_match" in table and "acc" in table
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"gemmakit_mc", "gemmakit_gen"} and "samples" not in results
    assert results["results"]["gemmakit_mc"]["sample_len"] == 3
    assert results["config"]["model_name"].endswith("tiny-gemma3") and results["config"]["batch_size"] == 2


def test_eval_command_with_sliding_window(setup, capsys):
    """--sliding-window on eval: scores change on a task with contexts longer than the window."""
    argv = ["eval", "--model", str(setup[0]), "--tasks", "gemmakit_ppl", "--include-path", str(TASKS), "--limit", "1"]
    assert main(argv) == 0
    full = capsys.readouterr().out
    assert main([*argv, "--sliding-window", "2"]) == 0
    assert capsys.readouterr().out != full


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown lm-eval task no_such_task"),
    (["--tasks", " , "], "--tasks needs at least one task name"),
    (["--tasks", "gemmakit_mc", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--tasks", "gemmakit_mc", "--include-path", "/nonexistent"], "no such folder (--include-path)"),
    (["--tasks", "gemmakit_mc", "--limit", "0"], "--limit must be > 0"),
])
def test_eval_errors_before_loading(args, message, setup, capsys, monkeypatch):
    from gemmakit import hub

    monkeypatch.setattr(hub, "load", lambda *a, **k: pytest.fail("weights were loaded before the error"))
    argv = ["eval", "--model", str(setup[0]), "--include-path", str(TASKS), *args]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmakit: error: ") and err.count("\n") == 1 and message in err


def test_gemma2_chat_puts_the_system_prompt_in_the_first_user_turn():
    """Gemma 1/2 have no system role: lm-eval's system instruction starts the first user turn (HFLM would
    drop it after the template's error)."""
    model = random_model(tiny_config(2).replace(vocab_size=VOCAB, max_seq_len=64))
    lm = GemmaLM(model, Tokenizer.from_gguf_vocab(tiny_vocab(VOCAB)))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert lm.apply_chat_template(chat) == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
                                            "Hello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
