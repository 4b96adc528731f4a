"""A gemmakit model for EleutherAI's lm-evaluation-harness (lm-eval 0.4): the three methods a harness model
has (`loglikelihood`, `loglikelihood_rolling`, `generate_until`), batched, through the KV cache and the
engine, and Google's chat template for instruction-tuned models.

    from gemmakit import hub
    from gemmakit.eval.lm_eval_model import GemmaLM
    import lm_eval

    model, tok = hub.load("path/to/gemma-3-1b-it")
    results = lm_eval.simple_evaluate(model=GemmaLM(model, tok, batch_size=8), tasks=["hellaswag"])

Tokens as lm-eval's HF model (`HFLM`) makes them for a Gemma checkpoint, so scores compare: a context is
encoded with one `<bos>` (none added to text that starts with "<bos>", as a rendered chat does), control-token
text in prompts is parsed (`<start_of_turn>`), the continuation is the tokens of context + continuation
after the context's, and an empty context is `<bos>`. One difference: `loglikelihood_rolling` (perplexity
tasks) scores `<bos>` + the text's tokens, where HFLM's default gives Gemma `<bos><bos>` + text and scores
the second `<bos>` too (lm-evaluation-harness issue 3333; HFLM with add_bos_token=False equals ours).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from gemmakit.cache import make_cache
from gemmakit.engine import left_pad, stream_text
from gemmakit.tokenizer import render_chat

CHUNK = 512  # tokens per forward through the cache: a long input never builds a [T, T] score matrix
LOGIT_FLOATS = 1 << 25  # logits computed at once (128 MB in fp32): rows of the [vocab] LM head output


class GemmaLM(TemplateLM):
    """lm-eval model over a gemmakit `Gemma` and its `Tokenizer`.

    batch_size: sequences per forward pass (loglikelihood) or decode batch (generate_until).
    max_length: longest input in tokens (default: the model's context); longer contexts lose tokens on the
    left, and rolling loglikelihoods use windows of this length. max_gen_toks: default new tokens of
    generate_until when the task gives none (256, as HFLM). compile: decode with the compiled step
    (gemmakit.compiled). seed: seed of sampled generation (tasks with do_sample).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, compile: bool = False, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        limit = model.config.max_seq_len
        if max_length is not None and not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be between 2 and {model.config.name}'s context of {limit}, "
                             f"got {max_length}")
        self.model, self.tok = model, tokenizer
        self.batch_size = batch_size
        self._max_length = max_length or limit
        self.max_gen_toks = max_gen_toks
        self.compile = compile
        self.seed = seed

    # -- what TemplateLM asks for -------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.token_id("<eos>")

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"gemmakit-gemma{self.model.config.generation}"

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results["config"]: which model, dtype and local window (--sliding-window) ran."""
        c = self.model.config
        return {"model_name": c.name, "model_dtype": str(self.model.dtype).removeprefix("torch."),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "sliding_window": c.sliding_window, "max_length": self.max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Ids of a prompt: control-token text parsed, `<bos>` first unless `add_special_tokens` is False or
        the text already starts with "<bos>"."""
        add_bos = add_special_tokens if add_special_tokens is not None else not string.startswith("<bos>")
        ids = self.tok.encode(string, add_bos=add_bos, parse_special=True)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(tokens), skip_special=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from gemmakit.tokenizer import chat_template as template

        return template(self.model.config.generation) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as Google's template renders it (starting with "<bos>"). Gemma 1/2 have no system role:
        a system message goes at the start of the first user turn, as Gemma 3's template puts it. Without
        `add_generation_prompt` the last (model) message is left open, to be continued."""
        messages = [dict(m) for m in chat_history]
        generation = self.model.config.generation
        if generation < 3 and messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
            if messages and messages[0]["role"] == "user":
                messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
            else:
                messages.insert(0, {"role": "user", "content": system})
        text = render_chat(messages, generation, add_generation_prompt)
        if not add_generation_prompt and messages[-1]["role"] in ("assistant", "model"):
            text = text.removesuffix("\n").removesuffix("<end_of_turn>")
        return text

    # -- scoring ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """For each input (ids fed) and target (the ids its last len(target) positions predict): the sum
        of log p(target) in fp32 and whether greedy decoding gives the target. One batch: left padded,
        run through the KV cache in chunks of CHUNK tokens; the LM head only on target positions."""
        device = self.model.model.embed_tokens.weight.device
        tokens, positions = left_pad(inputs, device)
        b, t = tokens.shape
        cache = make_cache(self.model.config, b, t, self.model.dtype, device)
        # Row r's targets sit in the last len(targets[r]) columns (everything is right-aligned).
        want = torch.zeros(b, t, dtype=torch.bool, device=device)
        goal = torch.zeros(b, t, dtype=torch.long, device=device)
        for r, tgt in enumerate(targets):
            want[r, t - len(tgt):] = True
            goal[r, t - len(tgt):] = torch.tensor(tgt, device=device)
        total = torch.zeros(b, dtype=torch.float64, device=device)
        misses = torch.zeros(b, dtype=torch.long, device=device)  # target positions greedy decoding gets wrong
        per_call = max(1, LOGIT_FLOATS // self.model.config.vocab_size)
        for s in range(0, t, CHUNK):
            h = self.model.hidden(tokens[:, s:s + CHUNK], positions[:, s:s + CHUNK], cache)
            rows, cols = want[:, s:s + CHUNK].nonzero(as_tuple=True)
            for k in range(0, len(rows), per_call):
                r, c = rows[k:k + per_call], cols[k:k + per_call]
                logp = F.log_softmax(self.model.logits(h[r, c]).float(), dim=-1)
                g = goal[r, s + c]
                total.index_add_(0, r, logp.gather(1, g[:, None])[:, 0].double())
                misses.index_add_(0, r, (logp.argmax(-1) != g).long())
        return [(float(x), m == 0) for x, m in zip(total.tolist(), misses.tolist())]

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per (key, context ids, continuation ids); a context +
        continuation longer than max_length + 1 loses tokens on the left, as in HFLM."""
        jobs = []
        for key, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            jobs.append(((context + continuation)[-(self.max_length + 1):][:-1], continuation))
        # Longest first: a batch pads to its first input, and a too-large batch fails at once.
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc="loglikelihood", disable=disable_tqdm)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            for j, answer in zip(idx, self._score([jobs[j][0] for j in idx], [jobs[j][1] for j in idx])):
                out[j] = answer
                if requests[j][0] is not None:  # lm-eval's response cache (--use_cache), as HFLM feeds it
                    self.cache_hook.add_partial("loglikelihood", requests[j][0], answer)
            bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (`<bos>` + its tokens, every token predicted once), in
        disjoint windows of max_length tokens as lm-eval's rolling windows cut them."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text generated for each (context, gen_kwargs), cut at the first stop string (`until`) or stop
        token, in batches of requests with equal gen_kwargs, through gemmakit.engine (greedy unless the
        task samples: do_sample with temperature, top_p, top_k)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if s]
            n_new = kwargs.pop("max_gen_toks")
            if n_new >= self.max_length:
                raise ValueError(f"max_gen_toks {n_new} leaves no room for a prompt in max_length {self.max_length}")
            sampling = dict(temperature=0.0)
            if kwargs.get("do_sample") and kwargs.get("temperature", 0.0) > 0:
                sampling = dict(temperature=float(kwargs["temperature"]), top_p=kwargs.get("top_p"),
                                top_k=kwargs.get("top_k"), seed=self.seed)
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - n_new) for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for k in range(0, len(order), self.batch_size):
                batch = order[k:k + self.batch_size]
                ids = [prompts[i] for i in batch]
                if self.compile and len(batch) < self.batch_size < len(order):  # reuse the full batch's compiled step
                    ids += [ids[-1]] * (self.batch_size - len(batch))
                for chunk in stream_text(self.model, self.tok, ids, n_new, stop=until, compile=self.compile,
                                         **sampling):
                    if chunk.completion is not None and chunk.index < len(batch):
                        i = batch[chunk.index]
                        out[i] = chunk.completion.text
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(batch))
        bar.close()
        return out


def evaluate_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, max_length: int | None = None,
                   apply_chat_template: bool = False, system_instruction: str | None = None, seed: int = 0,
                   compile: bool = False, task_manager=None) -> dict:
    """lm-eval's `simple_evaluate` on `tasks` with a GemmaLM; its results dict (per-task metrics under
    "results"). `include_path`: a folder of extra task YAMLs. Raises ValueError naming unknown tasks."""
    import lm_eval

    manager = task_manager or check_tasks(tasks, include_path)
    lm = GemmaLM(model, tokenizer, batch_size=batch_size, max_length=max_length, compile=compile, seed=seed)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                   task_manager=manager, apply_chat_template=apply_chat_template,
                                   system_instruction=system_instruction, log_samples=False,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed)


def check_tasks(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager over its own tasks and `include_path`; ValueError if a name is unknown."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:  # indexing lm-eval's own ~15,000 tasks takes 10-20 s: skip it when not needed
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in set(local.all_tasks) or local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    if unknown := [t for t in tasks if t not in known and not manager.match_tasks([t])]:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not among "
                         f"lm-eval's {len(known):,} tasks{where}")
    return manager


def format_results(results: dict) -> str:
    """lm-eval's own results table (markdown), groups after tasks."""
    from lm_eval.utils import make_table

    return make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
