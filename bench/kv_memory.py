"""The Gemma 3 report's Figure 6 for every Gemma 3 size: KV-cache memory against context length.

As built (local layers keep only their sliding window) against a cache where every layer is global,
batch 1, bf16 cache, contexts 1K-128K (each model up to its own context length). Computed from the
configs with `gemmakit.cache.cache_bytes` (the same arithmetic `make_cache` allocates, checked in
tests/test_cache.py), so nothing is allocated.

    python bench/kv_memory.py        # writes bench/results/kv_memory.{png,json,md}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gemmakit.cache import cache_bytes  # noqa: E402
from gemmakit.config import CONFIGS  # noqa: E402
from gemmakit.quant import weight_bytes  # noqa: E402

OUT = Path(__file__).parent / "results"
SIZES = [name for name, c in CONFIGS.items() if c.generation == 3]
CONTEXTS = [1024 * 2**i for i in range(8)]  # 1K .. 128K
GIB = 2**30


def rows() -> list[dict]:
    out = []
    for name in SIZES:
        c = CONFIGS[name]
        for n in CONTEXTS:
            if n > c.max_seq_len:
                continue
            built, glob = cache_bytes(c, 1, n, 2), cache_bytes(c, 1, n, 2, global_only=True)
            out.append(dict(model=name, context=n, kv_as_built_gib=built / GIB, kv_global_only_gib=glob / GIB,
                            ratio=built / glob, weights_bf16_gib=weight_bytes(c, None, 2) / GIB))
    return out


def plot(data: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(SIZES), figsize=(4 * len(SIZES), 3.8))
    for ax, name in zip(axes, SIZES):
        r = [x for x in data if x["model"] == name]
        ctx = [x["context"] / 1024 for x in r]
        ax.plot(ctx, [x["kv_global_only_gib"] for x in r], "o-", color="tab:red", label="global only")
        ax.plot(ctx, [x["kv_as_built_gib"] for x in r], "o-", color="tab:blue",
                label=f"as built (5 local : 1 global, window {CONFIGS[name].sliding_window})")
        ax.axhline(r[0]["weights_bf16_gib"], color="gray", ls="--", lw=1, label="bf16 weights")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx, [f"{int(k)}K" for k in ctx], fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KV cache, GiB (batch 1, bf16)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("KV-cache memory vs context: Gemma 3's local/global pattern against a global-only cache")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def markdown(data: list[dict]) -> str:
    lines = ["| model | context | KV as built GiB | KV global-only GiB | as built / global-only | "
             "global-only / bf16 weights | as built / bf16 weights |", "|---|---:|---:|---:|---:|---:|---:|"]
    for x in data:
        lines.append(f"| {x['model']} | {x['context']:,} | {x['kv_as_built_gib']:.3f} | {x['kv_global_only_gib']:.3f} | "
                     f"{x['ratio']:.3f} | {x['kv_global_only_gib'] / x['weights_bf16_gib']:.0%} | "
                     f"{x['kv_as_built_gib'] / x['weights_bf16_gib']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data = rows()
    for name, text in [("kv_memory.json", json.dumps(data, indent=2)), ("kv_memory.md", markdown(data))]:
        tmp = OUT / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, OUT / name)
    plot(data, OUT / "kv_memory.png")
    print(markdown(data))


if __name__ == "__main__":
    main()
