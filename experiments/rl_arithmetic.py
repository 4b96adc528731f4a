"""The RL experiment of docs/rl.md: few-shot addition (a two-digit plus a one-digit number) on the real
Gemma 3 270M, a task with a checkable answer where the base model starts well below perfect.

    python experiments/rl_arithmetic.py data OUT_DIR        # train.jsonl, test.jsonl (disjoint questions)
    python experiments/rl_arithmetic.py plot RUN_DIR... [--evals NAME=EVAL.json...] --out docs/rl-results
                                                            # table (.md, .json) and figure (.png)

Every prompt is 8 solved examples then the question, one per line, `a + b = ` (the format with the highest
base rate of those measured, docs/rl.md), and carries its "answer" for the `exact` reward. The 900
questions (a in 10..99, b in 0..9) are split once: 150 held out, the rest for training; the examples in
every prompt come from the training questions only, so a held-out answer never appears in any prompt.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SHOTS = 8
HELD_OUT = 150


def line(a: int, b: int) -> str:
    return f"{a} + {b} = "


def make(out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    questions = [(a, b) for a in range(10, 100) for b in range(10)]
    rng.shuffle(questions)
    test, train = questions[:HELD_OUT], questions[HELD_OUT:]

    def record(q: tuple[int, int]) -> dict:
        shots = rng.sample([t for t in train if t != q], SHOTS)
        prompt = "".join(f"{line(a, b)}{a + b}\n" for a, b in shots) + line(*q)
        return {"prompt": prompt, "answer": q[0] + q[1]}

    out.mkdir(parents=True, exist_ok=True)
    for name, qs in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(record(q)) + "\n" for q in qs))
    print(json.dumps({"train": len(train), "test": len(test), "out": str(out)}))


def _log(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln]


def plot(runs: list[Path], out: Path, evals: list[str] = ()) -> None:
    """OUT.{md,json,png} (docs/rl-results): held-out success, training success and KL to the start against
    the training CPU minutes (the process's CPU time: a fair clock on a shared machine), one line per run; `evals`
    (NAME=FILE, the JSON `gemmakit rl eval --kl-base` prints, e.g. for the WARP merge) add table rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fig = [], plt.figure(figsize=(13, 3.8))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for run in runs:
        log = _log(run)
        evals_ = [r for r in log if "eval_exact" in r]
        steps = [r for r in log if "reward" in r]
        kl_key = "kl_start" if any("kl_start" in r for r in steps) else "kl"
        clock = "cpu" if all("cpu" in r for r in log) else "time"
        if evals_:
            axes[0].plot([r[clock] / 60 for r in evals_], [r["eval_exact"] for r in evals_], marker="o", label=run.name)
        if steps:
            axes[1].plot([r[clock] / 60 for r in steps], [r.get("exact", r["reward"]) for r in steps], label=run.name)
            axes[2].plot([r[clock] / 60 for r in steps], [r[kl_key] for r in steps], label=run.name)
        last = steps[-10:]
        rows.append({"run": run.name, "steps": steps[-1]["step"] if steps else 0,
                     "cpu_minutes": round(steps[-1][clock] / 60, 1) if steps else 0,
                     "held_out_start": evals_[0]["eval_exact"] if evals_ else None,
                     "held_out_end": evals_[-1]["eval_exact"] if evals_ else None,
                     "train_success_last10": (sum(r.get("exact", r["reward"]) for r in last) / len(last)
                                              if last else None),
                     "kl_to_start_last10": sum(r[kl_key] for r in last) / len(last) if last else None})
    for item in evals:
        name, _, path = item.partition("=")
        res = json.loads(Path(path).read_text())
        rows.append({"run": name, "steps": None, "cpu_minutes": None, "held_out_start": None,
                     "held_out_end": res.get("exact"), "train_success_last10": None,
                     "kl_to_start_last10": res.get("kl_to_base")})
    for ax, title in zip(axes, ("held-out success (greedy)", "training success (sampled, T=1)",
                                "KL to the start (nats, per reply)")):
        ax.set_title(title)
        ax.set_xlabel("training CPU minutes")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    table = ["| run | steps | CPU minutes | held-out start | held-out end | train success (last 10 steps) "
             "| KL to start |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    table += [f"| {r['run']} | {fmt(r['steps'])} | {fmt(r['cpu_minutes'])} | {fmt(r['held_out_start'])} | "
              f"{fmt(r['held_out_end'])} | {fmt(r['train_success_last10'])} | {fmt(r['kl_to_start_last10'])} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("data")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("plot")
    s.add_argument("runs", nargs="+", type=Path)
    s.add_argument("--out", type=Path, default=Path("docs/rl-results"))
    s.add_argument("--evals", nargs="*", default=[], metavar="NAME=FILE", help="`rl eval` JSON outputs to add as rows")
    args = p.parse_args()
    if args.cmd == "data":
        make(args.out, args.seed)
    else:
        plot(args.runs, args.out, args.evals)


if __name__ == "__main__":
    main()
