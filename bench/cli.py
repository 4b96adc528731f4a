"""The speed users get from the command line: whole `gemmakit generate` processes against transformers and
llama.cpp on the same GGUF file.

Every variant is a separate process started as a user starts it, on the embedded Gemma 3 270M (its Q4_K_M
GGUF file, `hub.default_gguf()`), greedy, with the same prompt and the same number of threads:

- gemmakit: `gemmakit generate PROMPT --json --threads T [--dtype bfloat16 | --quantize int8|w8a8|int4|q8_0|fp8]`
  (the default compiled decode; a variant named "... eager" adds `--no-compile`). `--json` prints the
  token count and finish reason, which the benchmark checks, and gemmakit's own decode rate, which the
  JSON keeps beside the wall-time one. A timed process that prints a notice (compiling, rebuilding,
  decoding eagerly) is reported: its caches were not warm.
- transformers: this file as a small driver process (`--transformers-driver`): AutoTokenizer and
  AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) in fp32 or bf16, torch.set_num_threads(T),
  `generate(do_sample=False, min_new_tokens=max_new_tokens)` so that it cannot stop early.
- q4_0: the embedded model exported by `gemmakit export default --gguf F --type q4_0` (made once, in
  $GEMMAKIT_HOME/bench), run by `gemmakit generate --model F` (its Q4_0 blocks as stored, bf16 activations)
  and by llama.cpp: both programs on the same file.
- llama.cpp: its `llama-completion` (non-interactive: `-no-cnv`, `--temp 0`, `--ignore-eos`, `-t T`) on the
  file's own Q4_K_M weights (or the Q4_0 export), built from the llama.cpp source that the llama-cpp-python sdist on PyPI vendors
  (`--build-llama-cpp`, or automatically when the binary is missing; ~10 minutes on 2 cores) into
  $GEMMAKIT_HOME/bench/llama.cpp, outside the repository.

Each variant runs once with 1 new token and once with N+1 (default 129); decode rate = N / (wall time of the
N+1 process - wall time of the 1 process), within one repeat, so loading, prefill and exit cancel out.
Start-up: wall time of the whole process `gemmakit generate "Hello" --max-new-tokens 2` (an upper bound
on process start to the second token). Warm caches: one untimed run of every process first (it fills
gemmakit's compiled-step cache and the page cache); then `--repeats` rounds with the variants alternating,
medians reported. Every process must report exactly the requested number of new tokens, or the run stops.
"% of bandwidth limit" = decode tokens/s x weight bytes read per step / the machine's read bandwidth, both
as bench/inference.py measures them (the bandwidth once per repeat, the highest used).

    python bench/cli.py --build-llama-cpp                 # only build llama.cpp's binaries
    python bench/cli.py --threads 2 --repeats 5           # bench/results/cli.{md,json,png}
    python bench/cli.py --repeats 1 --max-new-tokens 9 --out /tmp/cli-smoke   # a quick check that it runs
    python bench/cli.py --variants "gemmakit bf16,gemmakit bf16 eager,transformers bf16"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
GEMMAKIT = ["gemmakit fp32", "gemmakit bf16", "gemmakit int8", "gemmakit w8a8", "gemmakit int4", "gemmakit q8_0",
            "gemmakit fp8", "gemmakit q4_0"]
VARIANTS = GEMMAKIT + ["transformers fp32", "transformers bf16", "llama.cpp q4_k_m", "llama.cpp q4_0"]
EAGER = [f"{v} eager" for v in GEMMAKIT]  # `--no-compile`; not in the default list
STARTUP = "gemmakit start-up"
# A prompt whose greedy continuation runs well past 129 tokens without <eos> in every gemmakit variant
# (gemmakit has no --ignore-eos; the count check below would catch an early stop).
PROMPT = "The history of the printing press in Europe begins"
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is built
TIMEOUT = 3600  # seconds for one process: a first compilation on a loaded machine takes minutes


def llama_dir() -> Path:
    from gemmakit import hub

    return hub.home() / "bench" / "llama.cpp"


def llama_binary(root: Path) -> Path:
    return root / "build" / "bin" / "llama-completion"


# -- building llama.cpp ------------------------------------------------------------------------------

# Loads a tile configuration and zeroes one tile, after asking Linux for the AMX state (arch_prctl).
AMX_PROBE = r"""
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
  unsigned char config[64];
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) return 2;
  memset(config, 0, sizeof config);
  config[0] = 1;    /* palette 1 */
  config[16] = 64;  /* tile 0: 64 bytes per row */
  config[48] = 16;  /* tile 0: 16 rows */
  _tile_loadconfig(config);
  _tile_zero(0);
  _tile_release();
  return 0;
}
"""


def amx_faults() -> bool:
    """Does this CPU advertise AMX but fault on it? Seen in a virtual machine: /proc/cpuinfo lists amx_tile,
    Linux grants the AMX state, and the first tile instruction raises SIGILL, so llama.cpp's native build
    (whose AMX path needs -march=native to see amx) crashes on its first matrix product."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    if "amx_tile" not in flags or shutil.which("cc") is None:
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "amx.c", Path(tmp) / "amx"
        src.write_text(AMX_PROBE)
        if subprocess.run(["cc", "-O1", "-mamx-tile", str(src), "-o", str(exe)], capture_output=True).returncode:
            return False  # a compiler without AMX: llama.cpp's build will not use it either
        return subprocess.run([str(exe)], capture_output=True).returncode != 0


def build_llama_cpp(root: Path, sdist_version: str = LLAMA_CPP_PYTHON) -> Path:
    """Download the llama-cpp-python sdist (it vendors llama.cpp's source) from PyPI with pip, and build
    `llama-completion` and `llama-simple` for this CPU (Release, GGML_NATIVE but no AMX where it faults,
    no curl/openssl) into
    root/build/bin. Prints cmake's progress. Returns the llama-completion binary; raises
    subprocess.CalledProcessError when a step fails, OSError when cmake is missing."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise OSError(f"building llama.cpp needs {tool} on PATH")
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"llama_cpp_python-{sdist_version}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        print(f"llama.cpp: downloading the llama-cpp-python {sdist_version} sdist (its vendored source) ...",
              flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={sdist_version}", "-d", str(root)], check=True)
        with tarfile.open(root / f"llama_cpp_python-{sdist_version}.tar.gz") as tar:
            tar.extractall(root, filter="data")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # Native, except AMX where it faults (amx_faults); the cache keeps the flags of a previous configure,
    # so they are always given.
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if amx_faults() else ""
    if no_amx:
        print("llama.cpp: this CPU lists AMX but faults on it: building without AMX", flush=True)
    flags = [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    print(f"llama.cpp: building llama-completion in {root / 'build'} (about 10 minutes on 2 cores) ...", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", *flags], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-completion", "llama-simple",
                    "-j", jobs], check=True)
    return llama_binary(root)


def llama_commit(binary: Path) -> str:
    """llama.cpp's commit as the binary reports it (`--version`: "version: ... (build N, commit C)")."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    m = re.search(r"commit (\w+)", out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


# -- the processes -----------------------------------------------------------------------------------

class Run:
    """How one variant is started, and how many new tokens its output says it made."""

    def __init__(self, name: str, args: argparse.Namespace, gguf: Path, gemmakit_flags: set[str]) -> None:
        self.name, self.threads, self.gguf, self.prompt = name, args.threads, gguf, args.prompt
        self.lib, self.kind, *rest = name.split()
        self.eager = rest == ["eager"]
        self.gemmakit_flags = gemmakit_flags
        self.binary = llama_binary(Path(args.llama_cpp_dir))

    def argv(self, n: int) -> list[str]:
        t = str(self.threads)
        if self.lib == "gemmakit":
            prompt = "Hello" if self.name == STARTUP else self.prompt
            cmd = ["gemmakit", "generate", prompt, "--max-new-tokens", str(n), "--json"]
            quantize = ["--quantize", self.kind] if self.kind in ("int8", "w8a8", "int4", "q8_0", "fp8") else []
            cmd += {"bf16": ["--dtype", "bfloat16"], "q4_0": ["--model", str(self.gguf)]}.get(self.kind, quantize)
            cmd += ["--threads", t] if "--threads" in self.gemmakit_flags else []
            return cmd + (["--no-compile"] if self.eager else [])
        if self.lib == "transformers":
            return [sys.executable, str(Path(__file__).resolve()), "--transformers-driver", self.kind,
                    "--gguf", str(self.gguf), "--threads", t, "--max-new-tokens", str(n), "--prompt", self.prompt]
        return [str(self.binary), "-m", str(self.gguf), "-p", self.prompt, "-n", str(n), "-t", t, "-tb", t,
                "--temp", "0", "--ignore-eos", "-no-cnv", "-c", "1024"]

    def env(self) -> dict:
        env = dict(os.environ)
        if self.lib == "gemmakit" and "--threads" not in self.gemmakit_flags:
            env["OMP_NUM_THREADS"] = str(self.threads)  # a gemmakit without --threads: torch reads this
        return env

    def run(self, n: int) -> dict:
        """Start the process for n new tokens; its wall time (s) and the generation's own decode rate."""
        t = time.perf_counter()
        p = subprocess.run(self.argv(n), capture_output=True, text=True, env=self.env(), timeout=TIMEOUT)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(f"{self.name}: `{shlex.join(self.argv(n))}` exited with {p.returncode}:\n"
                               f"{p.stderr[-2000:]}")
        made, own_rate, why = self.parse(p.stdout, p.stderr)
        if made != n:  # a process that stopped early would fake a fast rate
            raise RuntimeError(f"{self.name}: asked for {n} new tokens, made {made} ({why}); try another --prompt")
        # gemmakit's own notices (compiling, rebuilding a compiled step, decoding eagerly): in a timed run they
        # mean the caches were not warm or the fast path was not taken, so the run reports them.
        notices = [ln for ln in p.stderr.splitlines() if ln.startswith("gemmakit:")] if self.lib == "gemmakit" else []
        return dict(wall=wall, own_decode_tok_s=own_rate, notices=notices)

    def parse(self, stdout: str, stderr: str) -> tuple[int, float | None, str]:
        """(new tokens, the process's own decode tokens/s if it reports one, why it stopped)."""
        if self.lib == "gemmakit":
            out = json.loads(stdout.strip().splitlines()[-1])
            return (out["usage"]["completion_tokens"], out["timings"].get("decode_tokens_per_second"),
                    f"finish_reason {out['finish_reason']}")
        if self.lib == "transformers":
            out = json.loads(stdout.strip().splitlines()[-1])
            return out["completion_tokens"], None, "transformers"
        # llama.cpp: the first token comes from the prompt's pass, each further one from an "eval" run.
        # No timings at all (a crash before them) counts as no token.
        if "prompt eval time" not in stderr:
            return 0, None, "no timings printed"
        # It prints at least "1 runs" (to divide by), so 0 ms of eval time means no run.
        m = re.search(r"eval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+|inf) tokens per second", stderr)
        runs = int(m.group(2)) if m and float(m.group(1)) > 0 else 0
        return runs + 1, (float(m.group(3)) if runs else None), f"{runs} eval runs"


def transformers_driver(args: argparse.Namespace) -> None:
    """The transformers process: load the GGUF as a user does, generate greedily, print the count."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf)
    dtype = torch.bfloat16 if args.transformers_driver == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()
    inputs = tok(args.prompt, return_tensors="pt")
    n = args.max_new_tokens
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    made = out.shape[1] - inputs["input_ids"].shape[1]
    print(tok.decode(out[0, inputs["input_ids"].shape[1]:]), file=sys.stderr)
    print(json.dumps({"completion_tokens": int(made)}))


def weight_bytes(kind: str) -> int:
    """Bytes of weights one decode step reads: bench/inference.py's accounting, in a process of its own
    (loading and quantizing take GBs the driver should not keep)."""
    code = (f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); import inference; "
            f"print(inference.Gemmakit({kind!r}).weight_bytes())")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
               .stdout.split()[-1])


def gemmakit_flags() -> set[str]:
    """The options this gemmakit's `generate` has (--threads and --no-compile came with compiled commands)."""
    out = subprocess.run(["gemmakit", "generate", "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z-]+", out))


# -- the run -----------------------------------------------------------------------------------------

def machine(threads: int, llama: str | None) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    flags = re.search(r"flags\s*:\s*(.+)", cpuinfo)
    return dict(cpu=model.group(1).strip() if model else platform.processor(), cpu_count=os.cpu_count(),
                avx512_bf16=bool(flags and "avx512_bf16" in flags.group(1).split()), threads=threads,
                torch=version("torch"), transformers=version("transformers"), gemmakit=version("gemmakit"),
                llama_cpp_commit=llama, python=platform.python_version())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=129,
                    help="the long run's new tokens (default 129: decode rate over 128 steps)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from: {', '.join(VARIANTS + EAGER)} (\"eager\" adds --no-compile)")
    ap.add_argument("--no-startup", action="store_true", help="leave out the start-up measurement")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--llama-cpp-dir", default=None,
                    help="where llama.cpp is built (default $GEMMAKIT_HOME/bench/llama.cpp)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama.cpp's binaries and exit")
    ap.add_argument("--transformers-driver", choices=["fp32", "bf16"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transformers_driver:
        return transformers_driver(args)
    args.llama_cpp_dir = args.llama_cpp_dir or str(llama_dir())
    binary = llama_binary(Path(args.llama_cpp_dir))
    if args.build_llama_cpp:
        print(build_llama_cpp(Path(args.llama_cpp_dir)))
        return
    if args.max_new_tokens < 2:
        ap.error("--max-new-tokens must be at least 2 (the rate is over max-new-tokens - 1 steps)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS + EAGER]:
        ap.error(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS + EAGER)}")
    flags = gemmakit_flags()
    if "--threads" not in flags:
        print("gemmakit generate has no --threads yet: setting OMP_NUM_THREADS for it instead", file=sys.stderr)
    if any(v.endswith("eager") for v in variants) and "--no-compile" not in flags:
        ap.error("the eager variants need `gemmakit generate --no-compile`, which this gemmakit does not have")
    if any(v.startswith("llama.cpp") for v in variants) and not binary.is_file():
        print(f"llama.cpp's {binary.name} is missing: building it (once per machine)", file=sys.stderr)
        build_llama_cpp(Path(args.llama_cpp_dir))

    from gemmakit import hub

    sys.path.insert(0, str(HERE))
    import inference  # the bandwidth measurement and the results writer of the engine benchmark
    import torch

    torch.set_num_threads(args.threads)  # for the bandwidth measurement, the only compute in this process
    gguf = hub.default_gguf()
    q4_0 = inference.exported("q4_0") if any(v.endswith(" q4_0") for v in variants) else None
    runs = {v: Run(v, args, q4_0 if v.endswith(" q4_0") else gguf, flags)
            for v in variants + ([] if args.no_startup else [STARTUP])}
    n = args.max_new_tokens
    print("bytes read per decode step (bench/inference.py's accounting) ...", flush=True)
    per_kind = {k: weight_bytes(k) for k in dict.fromkeys(runs[v].kind for v in variants if v.startswith("gemmakit"))}
    weights = {v: per_kind[runs[v].kind] for v in variants if v.startswith("gemmakit")}
    llama = any(v.startswith("llama.cpp") for v in variants)
    meta = dict(machine=machine(args.threads, llama_commit(binary) if llama else None),
                prompt=args.prompt, new_tokens=n, gguf=gguf.name, command="python " + shlex.join(sys.argv))
    print("warm-up: every process once, untimed (compiles gemmakit's decode steps on a first run) ...", flush=True)
    for v, r in runs.items():
        for k in ((2,) if v == STARTUP else (1, n)):
            t = r.run(k)["wall"]
            print(f"  {v}, {k} new tokens: {t:.1f} s", flush=True)
    samples = {v: [] for v in runs}
    bw: list[float] = []
    for i in range(args.repeats):
        bw.append(inference.bandwidth())
        for v, r in runs.items():  # the variants alternate within every repeat
            if v == STARTUP:
                startup = r.run(2)
                samples[v].append(dict(wall=startup["wall"], notices=startup["notices"]))
                print(f"  {v}: {startup['wall']:.1f} s", flush=True)
                _warn(v, startup["notices"])
                continue
            short, long = r.run(1), r.run(n)
            print(f"  {v}: 1 new token {short['wall']:.1f} s, {n} new tokens {long['wall']:.1f} s", flush=True)
            _warn(v, short["notices"] + long["notices"])
            if long["wall"] <= short["wall"]:  # timing noise larger than the decoding: no rate from this pair
                print(f"  {v}: {n} tokens took no longer than 1 ({long['wall']:.2f} s, {short['wall']:.2f} s); "
                      "this repeat gives no rate (use more --max-new-tokens)", file=sys.stderr)
            samples[v].append(dict(wall1=short["wall"], wall_n=long["wall"], own_decode_tok_s=long["own_decode_tok_s"],
                                   notices=short["notices"] + long["notices"],
                                   decode_tok_s=(n - 1) / (long["wall"] - short["wall"])
                                   if long["wall"] > short["wall"] else None))
        print(f"repeat {i + 1}/{args.repeats} done", flush=True)
        write_results(Path(args.out), samples, weights, bw, meta, i + 1)  # an interrupted run keeps its medians


def _warn(variant: str, notices: list[str]) -> None:
    for line in dict.fromkeys(notices):
        print(f"  warning: a timed {variant} process printed: {line}", file=sys.stderr, flush=True)


def write_results(out: Path, samples: dict, weights: dict, bw: list[float], meta: dict, repeats: int) -> None:
    import inference

    limit = max(bw)  # as bench/inference.py: the highest measured, since the shared machine's bandwidth moves
    rows = []
    for v, s in samples.items():
        if v == STARTUP:
            continue
        med = {k: statistics.median(xs) if (xs := [x[k] for x in s if x[k] is not None]) else None
               for k in ("wall1", "wall_n", "decode_tok_s")}
        own = [x["own_decode_tok_s"] for x in s if x["own_decode_tok_s"] is not None]
        rows.append(dict(variant=v, **{f"{k}_s" if k.startswith("wall") else k: m for k, m in med.items()},
                         own_decode_tok_s=statistics.median(own) if own else None, weight_mib=(
                             weights[v] / 2**20 if v in weights else None),
                         fraction_of_limit=(med["decode_tok_s"] * weights[v] / limit
                                            if v in weights and med["decode_tok_s"] else None),
                         runs=s))
    startup = [x["wall"] for x in samples.get(STARTUP, [])]
    notices = {f"{v}: {ln}": None for v, s in samples.items() for x in s for ln in x["notices"]}
    meta = dict(meta, repeats=repeats, bandwidth_gb_s=limit / 1e9, bandwidth_runs_gb_s=[b / 1e9 for b in bw],
                startup_s=statistics.median(startup) if startup else None, startup_runs_s=startup,
                load_average=os.getloadavg(), notices=list(notices))
    out.mkdir(parents=True, exist_ok=True)
    inference.write_atomic(out / "cli.json", json.dumps(dict(meta=meta, rows=rows), indent=2))
    table = markdown(rows, meta)
    inference.write_atomic(out / "cli.md", table)
    plot(rows, meta, out / "cli.png")
    print(table)


def markdown(rows: list[dict], meta: dict) -> str:
    by = {r["variant"]: r["decode_tok_s"] for r in rows}
    m = meta["machine"]

    def ratio(v: str, ref: str) -> str:
        return f"{by[v] / by[ref]:.2f}x" if by.get(ref) and by[v] and v != ref else "-"

    lines = [f"`gemmakit generate` and the others as whole processes: Gemma 3 270M ({meta['gguf']}), "
             f"{m['threads']} threads, greedy, median of {meta['repeats']} rounds with the variants alternating, "
             f"warm caches. Decode = {meta['new_tokens'] - 1} / (wall time with {meta['new_tokens']} new tokens "
             f"- wall time with 1). Machine: {m['cpu']}, {m['cpu_count']} cores, avx512_bf16 "
             f"{'yes' if m['avx512_bf16'] else 'no'}; highest measured read bandwidth {meta['bandwidth_gb_s']:.1f} "
             f"GB/s. torch {m['torch']}, transformers {m['transformers']}, llama.cpp "
             f"{m['llama_cpp_commit'] or '-'} (its own Q4_K_M weights; q4_0 rows: both programs on gemmakit's "
             f"Q4_0 export of the same model; \"vs llama.cpp\" compares with llama.cpp on the same file).",
             "",
             "| variant | 1 token, s | " + f"{meta['new_tokens']} tokens, s | decode tok/s | vs transformers fp32 | "
             "vs transformers bf16 | vs llama.cpp | % of bandwidth limit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v = r["variant"]
        frac = "-" if r["fraction_of_limit"] is None else f"{r['fraction_of_limit']:.0%}"
        rate = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        lines.append(f"| {v} | {r['wall1_s']:.2f} | {r['wall_n_s']:.2f} | {rate} | "
                     f"{ratio(v, 'transformers fp32')} | {ratio(v, 'transformers bf16')} | "
                     f"{ratio(v, 'llama.cpp q4_0' if v.endswith(' q4_0') else 'llama.cpp q4_k_m')} | {frac} |")
    if meta["startup_s"] is not None:
        lines += ["", "Start-up, warm: `gemmakit generate \"Hello\" --max-new-tokens 2` takes "
                      f"{meta['startup_s']:.2f} s "
                      "as a whole process (an upper bound on process start to the second new token)."]
    if meta["notices"]:  # compiling or falling back in a timed run: these figures are not warm ones
        lines += ["", "Timed processes printed: " + "; ".join(f"`{x}`" for x in meta["notices"])]
    lines += ["", f"`{meta['command']}` (load average at the end "
                  f"{', '.join(f'{x:.1f}' for x in meta['load_average'])})", ""]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Decode tokens/s per variant as bars, gemmakit blue, llama.cpp orange, transformers gray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    values = [r["decode_tok_s"] or 0.0 for r in rows]  # no bar where there is no rate
    colors = ["tab:blue" if n.startswith("gemmakit") else "tab:orange" if n.startswith("llama") else "tab:gray"
              for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.6))
    ax.barh(names, values, color=colors)
    for y, x in enumerate(values):
        ax.text(x, y, f" {x:.1f}" if x else " -", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_xlabel("decode tokens/s, from the command line")
    startup = "" if meta["startup_s"] is None else f"; start-up {meta['startup_s']:.1f} s"
    ax.set_title(f"Gemma 3 270M, {meta['machine']['threads']} threads, median of {meta['repeats']}{startup}",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
