"""Peak memory of one distillation step: gemmakit's chunked losses vs the straightforward implementation.

Straightforward = what one writes first: full [tokens x vocab] logits of teacher and student,
softmax / log_softmax on them, autograd through it all. Chunked = gemmakit.train.losses, which goes
through the LM head `chunk` tokens at a time and never holds either model's full logits.

Each variant runs in its own process; the figure is the growth of the process's peak resident memory
(ru_maxrss) during one step (teacher forward, student forward, loss, backward) over the resident
memory just before it (models, optimizer-free). Teacher: the Gemma 3 270M shape (random weights: the
memory is the same); student: a d_model-128 Gemma 3 with the same 262,144-token vocabulary.

    python bench/distill_memory.py                  # 1,024 and 2,048 tokens (sequences of 512), chunk 256
    python bench/distill_memory.py --tokens 4096    # the straightforward full step needs ~17 GB

Prints a table and writes distill_memory.json and distill_memory.png next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ["full/straightforward", "full/chunked", "sampled/straightforward", "sampled/chunked"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_step(variant: str, tokens: int, seq_len: int, chunk: int, k: int) -> dict:
    import torch

    from gemmakit.config import get_config, layer_pattern
    from gemmakit.model import build
    from gemmakit.train import losses

    torch.manual_seed(0)
    teacher = build(get_config("gemma3-270m"), "cpu")
    teacher.init_weights()
    teacher.requires_grad_(False)
    student = build(get_config("gemma3-270m").replace(
        name="student", d_model=128, n_layers=6, n_heads=2, n_kv_heads=1, head_dim=64, intermediate_size=512,
        sliding_window=128, layer_types=layer_pattern(6, 6)), "cpu")
    student.init_weights()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 262144, (tokens // seq_len, seq_len), generator=g)
    y = torch.randint(0, 262144, x.shape, generator=g)
    objective, impl = variant.split("/")
    if objective == "sampled":  # the cache's contents for this batch (ids uint32 -> int64, probs fp16)
        ids = torch.randint(0, 262144, (*x.shape, k), generator=g)
        probs = torch.rand(*x.shape, k, generator=g).half()

    base = rss_bytes()
    t0 = time.perf_counter()
    if objective == "full":
        with torch.no_grad():
            th = teacher.hidden(x)
        if impl == "chunked":
            loss = losses.distill_full(student, student.hidden(x), teacher, th, y, chunk=chunk)
        else:
            with torch.no_grad():
                p_t = torch.softmax(teacher.logits(th).float(), -1)
            loss = -(p_t * torch.log_softmax(student(x).float(), -1)).sum(-1).mean()
    else:
        if impl == "chunked":
            loss = losses.distill_sampled(student, student.hidden(x), ids, probs, y, chunk=chunk)
        else:
            q = probs.float() / probs.float().sum(-1, keepdim=True)
            logp = torch.log_softmax(student(x).float(), -1).gather(-1, ids)
            loss = -(q * logp).sum(-1).mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "loss": float(loss), "step_peak_bytes": max(0, peak_bytes() - base),
            "seconds": seconds, "baseline_rss_bytes": base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048], help="tokens per step (one run each)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child, args.tokens[0], args.seq_len, args.chunk, args.k)))
        return

    rows = []
    for n in args.tokens:
        for v in VARIANTS:
            r = subprocess.run([sys.executable, __file__, "--child", v, "--tokens", str(n), "--seq-len",
                                str(args.seq_len), "--chunk", str(args.chunk), "--k", str(args.k)],
                               capture_output=True, text=True, check=True)
            rows.append({"tokens": n, **json.loads(r.stdout.strip().splitlines()[-1])})
            print(f"{n:6d} tokens  {v:26s} done", file=sys.stderr)
    gib = 2**30
    lines = [f"one distillation step, vocabulary 262,144, chunk {args.chunk}", "",
             "| tokens | objective | straightforward peak | chunked peak | ratio | loss (straightforward / chunked) |",
             "|---|---|---|---|---|---|"]
    summary = []
    for n in args.tokens:
        by = {r["variant"]: r for r in rows if r["tokens"] == n}
        for obj in ("full", "sampled"):
            a, b = by[f"{obj}/straightforward"], by[f"{obj}/chunked"]
            ratio = a["step_peak_bytes"] / max(b["step_peak_bytes"], 1)
            summary.append({"tokens": n, "objective": obj, "straightforward_gib": a["step_peak_bytes"] / gib,
                            "chunked_gib": b["step_peak_bytes"] / gib, "ratio": ratio})
            lines.append(f"| {n:,} | {obj} | {a['step_peak_bytes'] / gib:.2f} GiB | {b['step_peak_bytes'] / gib:.2f} GiB "
                         f"| {ratio:.1f}x | {a['loss']:.4f} / {b['loss']:.4f} |")
    print("\n".join(lines))
    (HERE / "distill_memory.json").write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary},
                                                         indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        ys = [next(r["step_peak_bytes"] for r in rows if r["tokens"] == n and r["variant"] == v) / gib
              for n in args.tokens]
        ax.bar([j + i * width for j in range(len(args.tokens))], ys, width, label=v,
               color=["C3", "C2", "C1", "C0"][i])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(args.tokens))], [f"{n:,} tokens" for n in args.tokens])
    ax.set_ylabel("peak memory of one step (GiB)")
    ax.set_title("One distillation step, vocabulary 262,144")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "distill_memory.png", dpi=110)


if __name__ == "__main__":
    main()
