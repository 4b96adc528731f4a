"""`gemmakit eval` (lm-evaluation-harness tasks) and `gemmakit memorization`: parsers and commands.

cli.py registers them with `add_parsers(sub)`; the model options, loading and error handling are the
CLI's own (cli._add_model_args, cli._load, UserError), so --quantize, --adapter, --sliding-window and
--threads work here as on `generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemmakit import cli


def add_parsers(sub) -> None:
    """Add the `eval` and `memorization` subcommands to cli.py's subparsers."""
    s = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a model (needs the `eval` extra: lm-eval)",
                       description="Evaluate a model on lm-evaluation-harness tasks with lm-eval's own evaluator "
                                   "(simple_evaluate) and gemmakit's model adapter (gemmakit.eval.lm_eval_model): "
                                   "loglikelihood, loglikelihood_rolling and generate_until, batched, through the "
                                   "KV cache. Task names are lm-eval's, or those of YAML files under --include-path.")
    s.add_argument("--tasks", required=True, help="comma-separated task (or group) names, e.g. hellaswag,gsm8k")
    s.add_argument("--include-path", default=None, metavar="DIR",
                   help="also read task YAML files from DIR (local tasks; relative data_files are read from the "
                        "current directory, as `datasets` does)")
    s.add_argument("--limit", type=float, default=None, metavar="N",
                   help="only the first N documents of each task (< 1: that fraction; for testing, as in lm-eval)")
    s.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples per prompt (default: the task's own, else 0)")
    s.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass or decode batch (default 8)")
    s.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="longest input in tokens: longer contexts are cut from the left, rolling "
                        "loglikelihoods (perplexity tasks) use windows of N (default: the model's context)")
    s.add_argument("--apply-chat-template", action="store_true",
                   help="format prompts with the model's chat template (instruction-tuned models; few-shot "
                        "examples as turns), as lm-eval's --apply_chat_template")
    s.add_argument("--system-instruction", default=None, metavar="TEXT",
                   help="system prompt for --apply-chat-template (Gemma 1/2: put at the start of the first user turn)")
    s.add_argument("--output-path", default=None, metavar="FILE",
                   help="also write lm-eval's results (metrics, config, versions) as JSON to FILE")
    s.add_argument("--seed", type=int, default=0, help="seed of few-shot sampling and of sampled generation "
                                                         "(default 0; lm-eval's default is 1234 for few-shot)")
    cli._add_model_args(s)
    cli._add_compile_arg(s)
    s.set_defaults(func=eval_cmd)

    s = sub.add_parser("memorization", help="exact and approximate memorization rates (the Gemma reports' method)",
                       description="Sample N disjoint spans of PREFIX + SUFFIX tokens from the documents (never across "
                                   "two), prompt the model with <bos> + the prefix, decode SUFFIX tokens greedily, "
                                   "and count exact matches and approximate ones (token edit distance at most 10% of "
                                   "the suffix: 5 of 50, as in the Gemma 3 report; exact ones included). Rates come "
                                   "with 95% Wilson score intervals.")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help=".txt files (one document each), .jsonl files (a 'text' field per line, one document each) "
                        "or folders of them; tokenized as plain text")
    s.add_argument("--prefix", type=int, default=50, help="prompt tokens per span (default 50)")
    s.add_argument("--suffix", type=int, default=50, help="tokens decoded and compared per span (default 50)")
    s.add_argument("--samples", type=int, default=1000, metavar="N", help="spans to test (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="seed of the span sampling (default 0)")
    s.add_argument("--batch-size", type=int, default=16, help="spans decoded at once (default 16)")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object (counts, rates, intervals, per-span distances) instead of the table")
    cli._add_model_args(s)
    cli._add_compile_arg(s)
    s.set_defaults(func=memorization_cmd)


def memorization_cmd(args: argparse.Namespace) -> None:
    from gemmakit.eval.memorization import memorization
    from gemmakit.train.data import read_documents

    for flag in ("prefix", "suffix", "samples", "batch_size"):
        cli._at_least("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    # Read before the model loads: a missing file, an empty folder or a bad JSONL line fails fast.
    texts = [doc.text for doc in read_documents(args.data)]
    model, tokenizer = cli._load(args)
    docs = [tokenizer.encode(t, add_bos=False, parse_special=False) for t in texts]
    result = memorization(model, docs, tokenizer.bos_id, args.samples, args.prefix, args.suffix, args.seed,
                          args.batch_size, compile=cli._compile(args, model), progress=sys.stderr.isatty())
    tokens = sum(map(len, docs))
    if args.json:
        out = result.to_dict() | {"documents": len(docs), "tokens": tokens, "seed": args.seed,
                                   "data": [str(p) for p in args.data]}
        print(json.dumps(out))
        return
    print(format_result(result, len(docs), tokens))


def format_result(r, documents: int, tokens: int) -> str:
    """The memorization table as `gemmakit memorization` prints it."""
    def row(name: str, k: int, rate: float, ci: tuple[float, float]) -> str:
        return f"{name:18s} {k:6,d}  {rate:8.3%}  95% CI [{ci[0]:.3%}, {ci[1]:.3%}]"

    return "\n".join([
        f"spans {r.spans:,} (prefix {r.prefix} + suffix {r.suffix} tokens) from {documents:,} documents, "
        f"{tokens:,} tokens",
        row("exact match", r.exact, r.exact_rate, r.exact_ci95),
        row("approximate match", r.approximate, r.approximate_rate, r.approximate_ci95)
        + f"  (edit distance <= {r.max_distance})",
        "intervals: Wilson score",
    ])


def eval_cmd(args: argparse.Namespace) -> None:
    from gemmakit.eval.lm_eval_model import evaluate_tasks, format_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise cli.UserError("--tasks needs at least one task name")
    cli._at_least("--batch-size", args.batch_size, 1)
    cli._at_least("--num-fewshot", args.num_fewshot, 0)
    cli._at_least("--max-length", args.max_length, 2)
    if args.limit is not None and not args.limit > 0:
        raise cli.UserError(f"--limit must be > 0, got {args.limit}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"no such folder (--include-path): {args.include_path}")
    out = Path(args.output_path) if args.output_path else None
    if out is not None and out.is_dir():
        raise cli.UserError(f"--output-path {out} is a directory; give a file name")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise cli.UserError("gemmakit eval needs lm-eval: pip install 'gemmakit[eval]' (or lm-eval==0.4.13)") from None
    from gemmakit.eval.lm_eval_model import check_tasks

    manager = check_tasks(tasks, args.include_path)  # unknown task names fail before the model loads
    model, tokenizer = cli._load(args)
    results = evaluate_tasks(model, tokenizer, tasks, task_manager=manager, include_path=args.include_path,
                             limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size, max_length=args.max_length,
                             apply_chat_template=args.apply_chat_template,
                             system_instruction=args.system_instruction, seed=args.seed,
                             compile=cli._compile(args, model))
    print(format_results(results))
    if out is not None:
        from lm_eval.utils import handle_non_serializable

        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                                  default=handle_non_serializable))
        tmp.replace(out)  # never half written
