"""Memorization of the real Gemma 3 270M on text it has likely seen against text it cannot have seen.

Sources (experiments/memorization_sources.py): Shakespeare's plays, the King James Bible, and the same
plays with their words shuffled (the control). For each, N disjoint 100-token spans, prompted with <bos> +
50 tokens, 50 tokens decoded greedily (gemmakit.eval.memorization; what `gemmakit memorization --data DIR
--samples N --json` prints for one source).

    nice -n 19 python experiments/memorization.py --threads 1 --samples 1000 --docs docs

Writes OUT/memorization.json after every source (a rerun skips those it holds) and OUT/memorization.png +
.md at the end (`--docs DIR` copies the PNG and JSON there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memorization_sources import kjv_books, shakespeare_plays, shuffled  # noqa: E402

LABELS = {"shakespeare": "Shakespeare", "bible": "King James Bible", "shuffled": "Shakespeare, words shuffled"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sources", nargs="+", default=list(LABELS))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="experiments/out/memorization")
    p.add_argument("--docs", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from gemmakit import hub
    from gemmakit.eval.memorization import memorization

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memorization.json"
    results = json.loads(path.read_text()) if path.exists() else {"sources": {}}
    model, tok = hub.load(None, dtype=torch.float32, progress=False)
    plays = shakespeare_plays()
    texts = {"shakespeare": lambda: plays, "bible": kjv_books, "shuffled": lambda: shuffled(plays)}
    results.update(model=model.config.name, dtype="float32", threads=args.threads, seed=args.seed,
                   torch=torch.__version__)
    for source in args.sources:
        if source in results["sources"]:
            continue
        docs = [tok.encode(t, add_bos=False, parse_special=False) for t in texts[source]().values()]
        start = time.perf_counter()
        r = memorization(model, docs, tok.bos_id, args.samples, seed=args.seed, batch_size=args.batch_size,
                         compile=args.compile, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - start
        results["sources"][source] = r.to_dict() | {"documents": len(docs), "tokens": sum(map(len, docs)),
                                                    "seconds": round(seconds, 1)}
        print(f"{source}: exact {r.exact}/{r.spans}, approximate {r.approximate}/{r.spans} ({seconds:.0f} s)",
              flush=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(path)
    write_report(results, out)
    if args.docs:
        shutil.copy(out / "memorization.png", Path(args.docs) / "memorization.png")
        shutil.copy(path, Path(args.docs) / "memorization.json")


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["| source | documents | tokens | spans | exact | exact rate (95% CI) | approximate | "
            "approximate rate (95% CI) | approximate / exact |", "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    names = [s for s in LABELS if s in results["sources"]]
    for s in names:
        r = results["sources"][s]
        ratio = f"{r['approximate'] / r['exact']:.1f}x" if r["exact"] else "-"
        rows.append(f"| {LABELS[s]} | {r['documents']} | {r['tokens']:,} | {r['spans']:,} | {r['exact']} | "
                    f"{r['exact_rate']:.2%} [{r['exact_ci95'][0]:.2%}, {r['exact_ci95'][1]:.2%}] | "
                    f"{r['approximate']} | {r['approximate_rate']:.2%} [{r['approximate_ci95'][0]:.2%}, "
                    f"{r['approximate_ci95'][1]:.2%}] | {ratio} |")
    (out / "memorization.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))

    fig, (ax, cdf) = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.38
    for k, (kind, color) in enumerate([("exact", "tab:blue"), ("approximate", "tab:orange")]):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        rates = [100 * results["sources"][s][f"{kind}_rate"] for s in names]
        lo = [100 * results["sources"][s][f"{kind}_ci95"][0] for s in names]
        hi = [100 * results["sources"][s][f"{kind}_ci95"][1] for s in names]
        # Points, not bars: a rate of 0 (with its interval) stays visible.
        ax.errorbar(xs, rates, yerr=[[r - a for r, a in zip(rates, lo)], [b - r for r, b in zip(rates, hi)]],
                    fmt="o", color=color, capsize=5,
                    label=f"{kind}" + (" (edit distance <= 5 of 50)" if kind == "approximate" else ""))
    ax.set_xticks(range(len(names)), [LABELS[s].replace(", ", ",\n") for s in names], fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("% of spans memorized (95% Wilson interval)")
    spans = results["sources"][names[0]]["spans"]
    ax.set_title(f"Gemma 3 270M: 50-token suffix from a 50-token prefix, {spans:,} spans per source", fontsize=9)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    # How close the greedy continuation comes, span by span: the share of spans within each edit distance.
    for s in names:
        d = sorted(results["sources"][s]["distances"])
        cdf.step(d, [(i + 1) / len(d) for i in range(len(d))], where="post", label=LABELS[s])
    cdf.axvline(results["sources"][names[0]]["max_distance"], color="gray", ls="--", lw=1,
                label="approximate-match threshold")
    cdf.set_xlabel("token edit distance between the greedy 50 tokens and the true 50")
    cdf.set_ylabel("share of spans at or below")
    cdf.set_title("distribution of edit distances", fontsize=9)
    cdf.set_xlim(0, results["sources"][names[0]]["suffix"])
    cdf.grid(alpha=0.3)
    cdf.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memorization.png", dpi=110)


if __name__ == "__main__":
    main()
