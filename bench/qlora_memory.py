"""Peak memory of LoRA training steps: QLoRA (int8 / int4 base) against LoRA on a bf16 and an fp32 base.

Each variant runs in its own process: build (or load) the base, quantize it for QLoRA, add rank-8 LoRA
adapters to every projection, then run a few training steps exactly as `gemmakit sft --lora-rank 8
[--quantize-base MODE] --bf16` does (the trainer's loss, AdamW on the adapters, bf16 autocast), on
sequences where ~45% of the tokens are reply targets, as in chat SFT.

Two settings: "lean" (--activation-checkpointing --chunk 64: what one runs to save memory; then the
weights are most of what a step holds) and "default" (the trainer's defaults, --chunk 1024, no
activation checkpointing: the saved activations and the LM head's [tokens x 262,144] temporaries are
then as big as the base).

Memory is the process's resident set (torch's CPU allocations are invisible to tracemalloc): before
the steps, the peak is reset (`/proc/self/clear_refs` 5), so "training peak" is the high-water mark
of the steps alone (VmHWM); "runtime" is the resident set after importing torch and gemmakit, before
any model (the same in every variant), and "above runtime" the training peak minus it. "setup peak" is
the high-water mark of building or loading the base. "stored" counts the bytes of the model's
parameters and buffers (base, norms, adapters).

    python bench/qlora_memory.py              # a 6-layer model of the Gemma 3 270M's shapes, built on the fly
    python bench/qlora_memory.py --real       # the real Gemma 3 270M (the embedded default)

Prints a table and writes qlora_memory.json and qlora_memory.md (the table) to bench/results/, or
qlora_memory_real.* with --real.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ["lora-fp32", "lora-bf16", "qlora-int8", "qlora-int4"]
MiB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(variant: str, real: bool, steps: int, seq_len: int, batch_size: int, threads: int, chunk: int,
          checkpointing: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    from gemmakit.train.lora import apply_lora
    from gemmakit.train.losses import IGNORE
    from gemmakit.train.parallel import apply_activation_checkpointing
    from gemmakit.train.qlora import quantize_base, stored_bytes
    from gemmakit.train.trainer import TrainConfig, ce_loss, make_optimizer

    runtime = _status("VmRSS")

    dtype = torch.float32 if variant == "lora-fp32" else torch.bfloat16
    if real:
        from gemmakit import hub

        model, _ = hub.load(None, dtype=dtype, progress=False)
    else:
        from gemmakit.config import get_config
        from gemmakit.model import build

        c = get_config("gemma3-270m")
        model = build(c.replace(name="gemma3-270m-6-layers", n_layers=6, layer_types=c.layer_types[:6]), "cpu", dtype)
        model.init_weights(generator=torch.Generator().manual_seed(0))
    if variant.startswith("qlora"):
        quantize_base(model, variant.split("-")[1])
    apply_lora(model, 8, 16.0, generator=torch.Generator().manual_seed(0))
    if checkpointing:
        apply_activation_checkpointing(model)
    stored = stored_bytes(model)
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    setup_peak = _status("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed setup memory back to the system before measuring
    start = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: from here on it is the steps' peak
    cfg = TrainConfig(bf16=True, chunk=chunk)
    opt = make_optimizer(model, cfg)
    loss_fn = ce_loss(cfg.chunk)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    model.train()
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        targets = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        targets[:, : int(seq_len * 0.55)] = IGNORE  # the prompts: no targets
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, {"tokens": tokens, "targets": targets})
        loss.backward()
        opt.step()
        losses.append(round(float(loss.detach()), 4))
    peak = _status("VmHWM")
    return {"variant": variant, "model": model.config.name, "chunk": chunk, "activation_checkpointing": checkpointing,
            "stored_mib": stored / MiB, "adapters_mib": adapters / MiB, "runtime_mib": runtime / MiB,
            "setup_peak_mib": setup_peak / MiB, "rss_before_steps_mib": start / MiB, "training_peak_mib": peak / MiB,
            "above_runtime_mib": (peak - runtime) / MiB, "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", action="store_true", help="the real Gemma 3 270M instead of the 6-layer model")
    p.add_argument("--steps", type=int, default=3, help="training steps per variant (default 3)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.real, args.steps, args.seq_len, args.batch_size, args.threads,
                               args.chunk, args.activation_checkpointing)))
        return
    rows = []
    settings = {"lean": ["--chunk", "64", "--activation-checkpointing"], "default": ["--chunk", "1024"]}
    for name, extra in settings.items():
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads), *extra] + \
                (["--real"] if args.real else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append({"setting": name, **json.loads(out.strip().splitlines()[-1])})
            print(f"{name} {v}: done", file=sys.stderr)
    lines = [f"{rows[0]['model']}: {args.steps} training steps of batch {args.batch_size} x {args.seq_len} tokens, LoRA "
             f"rank 8 on every projection, bf16 autocast, {args.threads} thread(s); lean = --activation-checkpointing "
             f"--chunk 64, default = --chunk 1024. MiB.", "",
             "| setting | variant | stored | runtime | before the steps | training peak | above runtime | vs LoRA bf16 "
             "| setup peak | losses |", "|" + "---|" * 10]
    for r in rows:
        ref = next(x for x in rows if x["setting"] == r["setting"] and x["variant"] == "lora-bf16")
        lines.append(f"| {r['setting']} | {r['variant']} | {r['stored_mib']:.0f} | {r['runtime_mib']:.0f} | "
                     f"{r['rss_before_steps_mib']:.0f} | {r['training_peak_mib']:.0f} | {r['above_runtime_mib']:.0f} | "
                     f"{r['above_runtime_mib'] / ref['above_runtime_mib']:.2f}x | {r['setup_peak_mib']:.0f} | "
                     f"{', '.join(f'{x:.3f}' for x in r['losses'])} |")
    table = "\n".join(lines)
    print(table)
    out = HERE / "results" / ("qlora_memory_real" if args.real else "qlora_memory")
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
