"""`gemmakit` command line: argparse subcommands, each a small function that consumes the library.

Errors a user can cause (bad file, unknown name, too-long prompt, ...) end in one line naming the
problem; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

from gemmakit.config import CONFIGS, Config


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def describe(config: Config) -> str:
    """Config fields, parameter counts and bf16 weight memory, as `gemmakit info` prints them."""
    lines = [f"{config.name} (Gemma {config.generation})"]
    for field, value in vars(config).items():
        if field in ("name", "layer_types", "vision"):
            continue
        lines.append(f"  {field:24s} {value}")
    kinds = "".join("G" if t == "global" else "L" for t in config.layer_types)
    lines.append(f"  {'layer_types':24s} {kinds}  (L = local sliding window, G = global)")
    counts = config.param_counts()
    total = sum(counts.values())
    lines.append("parameters")
    for k, v in counts.items():
        lines.append(f"  {k:24s} {v:>16,}")
    lines.append(f"  {'total':24s} {total:>16,}")
    lines.append(f"weights in bf16            {_fmt_bytes(2 * total)}")
    return "\n".join(lines)


def _at_least(flag: str, value: int | None, minimum: int, why: str = "") -> None:
    """Refuse an out-of-range option (None: not given) before anything loads."""
    if value is not None and value < minimum:
        raise UserError(f"{flag} must be at least {minimum}{why}, got {value}")


_TRAIN_ONLY = ("gpus", "seq_len", "lora_rank", "quantize_base", "activation_checkpointing", "bf16", "chunk",
               "gpu_memory")


def cmd_info(args: argparse.Namespace) -> None:
    from gemmakit import hub
    from gemmakit.engine import format_plan, memory_plan

    if not args.train:
        given = [name for name in _TRAIN_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} plans training memory: add --train")
    elif args.context is not None or args.kv_dtype is not None:
        raise UserError(f"--{'context' if args.context is not None else 'kv-dtype'} plans inference memory, "
                        f"not training (--train): give --seq-len for training sequences")
    _at_least("--context", args.context, 1)  # 0 is not "the default": it is refused
    _at_least("--batch", args.batch, 1)
    config = hub.load_config(args.model)  # a preset, GGUF file, HF directory, hub id or default; no weights
    if args.train:
        return _info_train(args, config)
    context = config.max_seq_len if args.context is None else args.context
    plan = memory_plan(config, context, args.batch or 1, args.kv_dtype or "bf16")  # checks context first
    print(describe(config))
    print(format_plan(plan, _fmt_bytes))


def _info_train(args: argparse.Namespace, config: Config) -> None:
    """`info --train`: gemmakit.train.memory's per-rank plan and the fewest accelerators that fit."""
    from gemmakit.train import memory

    defaults = memory.Setup()  # `gemmakit train`'s defaults (tested)
    _at_least("--gpus", args.gpus, 1)
    _at_least("--seq-len", args.seq_len, 1)
    _at_least("--lora-rank", args.lora_rank, 1)
    _at_least("--chunk", args.chunk, 1)
    if args.quantize_base and not args.lora_rank:
        raise UserError(f"--quantize-base {args.quantize_base} needs --lora-rank: the quantized base is frozen, "
                        f"only LoRA adapters train (QLoRA)")
    seq_len = defaults.seq_len if args.seq_len is None else args.seq_len
    if seq_len > config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds {config.name}'s context length of {config.max_seq_len} tokens")
    mode = "qlora" if args.quantize_base else ("lora" if args.lora_rank else "full")
    setup = memory.Setup(batch=defaults.batch if args.batch is None else args.batch, seq_len=seq_len, mode=mode,
                         lora_rank=args.lora_rank or 16, quantize_base=args.quantize_base or "int4", bf16=args.bf16,
                         activation_checkpointing=args.activation_checkpointing,
                         chunk=defaults.chunk if args.chunk is None else args.chunk, gpus=args.gpus or 1)
    gpu_bytes = memory.parse_size(args.gpu_memory or "80GB")
    print(describe(config))
    print(memory.format_plan(memory.plan(config, setup), _fmt_bytes))
    print(memory.format_fits(config, setup, gpu_bytes, _fmt_bytes))


# -- paths given on the command line: checked before any loading ------------------------------------

def _input_file(path: str, what: str) -> Path:
    """`path` if it is a readable file; else an error saying whether it is missing, a directory or unreadable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a {what}")
    if not p.exists():
        raise FileNotFoundError(f"no such {what}: {p}")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"cannot read the {what} {p}: permission denied")
    return p


def _output_dir(path: str) -> Path:
    """`path` if a new model directory can be written there: it is absent or an empty directory, and the
    directory that will hold it (its nearest existing ancestor) takes new files."""
    out = Path(path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")
    # Written as a temporary directory next to `out`, then renamed: its parent must take new entries.
    where = out.absolute().parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise UserError(f"cannot create {out}: {where} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise PermissionError(f"cannot create {out}: {where} is not writable ({(e.strerror or str(e)).lower()})") from None
    return out


# -- running a model ------------------------------------------------------------------------------

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default=None,
                   help="GGUF file, HF directory, hub id, or `default` (the embedded Gemma 3 270M, the default)")
    s.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="compute dtype (default float32; bfloat16 with --quantize or a Q4_0/Q8_0 GGUF, whose "
                        "int8/int4 kernels are fast with bf16 activations)")
    s.add_argument("--quantize", default=None, choices=["int8", "int4", "int4-channel", "q4_0", "q8_0", "fp8", "w8a8"],
                   help="quantization (default: none): weight-only int8 per channel, int4 in groups of 32, "
                        "int4-channel (one group per channel), q4_0 / q8_0 (llama.cpp's blocks of 32), fp8 (e4m3, "
                        "a scale per channel); or w8a8: int8 weights times activations rounded to int8 per token "
                        "(fastest for many streams at once and for long prompts)")
    s.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory, folded into the weights at load (default: none)")
    from gemmakit.eval.window import add_sliding_window_arg

    add_sliding_window_arg(s)


# Models below this size decode eagerly unless --compile is given: their steps take milliseconds anyway,
# and a first compilation costs a minute (every published Gemma is above it: the smallest has 268M).
COMPILE_MIN_PARAMS = 100_000_000


def _add_compile_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with the compiled step (the default for models of 100M parameters or more, every "
                        "published Gemma): the first run of a model, dtype, quantization, batch and thread count on "
                        "a machine compiles it once (a note on stderr says about how long: a minute or two for the "
                        "embedded model) into gemmakit's cache, and later runs load it in a fraction of a second. "
                        "--no-compile decodes eagerly")


def _compile(args: argparse.Namespace, model) -> bool:
    """--compile / --no-compile, or when neither is given, whether the model is large enough to gain."""
    choice = getattr(args, "compile", False)
    return choice if choice is not None else sum(model.config.param_counts().values()) >= COMPILE_MIN_PARAMS


def _add_sampling_args(s: argparse.ArgumentParser, max_new_tokens: int) -> None:
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="sampling: keep the smallest set reaching probability p")
    s.add_argument("--min-p", type=float, default=None,
                   help="sampling: keep tokens at least p times as likely as the most likely one")
    s.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")
    s.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="divide positive / multiply negative logits of every token already in the prompt or "
                        "the output by R (CTRL/transformers; also when greedy; 1 = off, the default)")
    s.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end the text where STRING appears, STRING not printed (repeatable)")


def _sampling(args: argparse.Namespace) -> dict:
    """engine.generate's sampling keywords from the parsed options."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=getattr(args, "min_p", None), repetition_penalty=getattr(args, "repetition_penalty", None),
                seed=args.seed)


def _check_sampling(args: argparse.Namespace) -> None:
    """Refuse out-of-range options of _add_sampling_args before anything loads (ValueError naming the flag)."""
    from gemmakit.sample import check_sampling
    from gemmakit.tokenizer import check_utf8

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for stop in args.stop:
        if not check_utf8(stop, "--stop"):
            raise ValueError("--stop needs a non-empty string")
    kw = _sampling(args)
    kw.pop("seed")
    try:
        check_sampling(**kw)
    except ValueError as e:  # "top_p must be ..." -> "--top-p must be ..."
        name, rest = str(e).split(" ", 1)
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None


def _warn_if_ignored(args: argparse.Namespace) -> None:
    """Greedy decoding (the default) ignores the sampling options: say so in one line on stderr."""
    if args.temperature == 0:
        ignored = [f"--{k.replace('_', '-')}" for k in ("top_k", "top_p", "min_p", "seed")
                   if getattr(args, k, None) is not None]
        if ignored:
            print(f"gemmakit: warning: {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect "
                  "with greedy decoding (--temperature 0, the default); give --temperature > 0 to sample",
                  file=sys.stderr)


def _block_file(spec: str | None) -> bool:
    """Is SPEC a local GGUF file whose matrices load as their Q4_0/Q8_0 blocks (quantized weights, which
    compute in bf16 by default as --quantize does)? Reads the file's header and tensor table only."""
    if not spec or not spec.endswith(".gguf") or not Path(spec).expanduser().is_file():
        return False
    from gemmakit.gguf import native_blocks, open_gguf

    try:
        return native_blocks(open_gguf(Path(spec).expanduser()))
    except (ValueError, OSError):  # a damaged file: hub.load says what is wrong with it
        return False


def _load(args: argparse.Namespace):
    import torch

    from gemmakit import hub

    native = not getattr(args, "adapter", None)
    dtype = args.dtype or ("bfloat16" if args.quantize or (native and _block_file(args.model)) else "float32")
    window = getattr(args, "sliding_window", None)
    if window is not None:  # --sliding-window: refused before any weights load (N < 1, no local layers)
        from gemmakit.eval.window import check_sliding_window

        check_sliding_window(hub.load_config(args.model), window)
    # Q4_0/Q8_0 GGUF blocks stay as stored (no float copy) unless an adapter must go into float weights.
    model, tokenizer = hub.load(args.model, dtype=getattr(torch, _DTYPES[dtype]), native=native)
    if window is not None:  # before anything builds a cache: caches are sized from model.config
        from gemmakit.eval.window import set_sliding_window

        set_sliding_window(model, window)
    if args.adapter:  # before quantizing: the adapter's update is added to the float weights
        from gemmakit.adapters import load_adapter

        load_adapter(model, args.adapter)
    if args.quantize:
        from gemmakit.quant import quantize

        quantize(model, args.quantize)
    return model, tokenizer


def _stream(model, tokenizer, ids: list[int], args: argparse.Namespace, out=None, images=None) -> str:
    """Generate from `ids`, writing text to `out` as it comes; return the text (stop token/string excluded)."""
    from gemmakit.engine import stream_text

    chunks = stream_text(model, tokenizer, [ids], args.max_new_tokens, stop=getattr(args, "stop", ()),
                         images=images, compile=_compile(args, model), **_sampling(args))
    return _write_chunks(chunks, out or sys.stdout).text


def _write_chunks(chunks, out):
    """Write one prompt's text chunks to `out` as they come; return its Completion."""
    for chunk in chunks:
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        if chunk.completion is not None:
            return chunk.completion
    raise AssertionError("stream_text ended without a completion")


def _read_text(path: str, what: str) -> str:
    """A UTF-8 file's text ("-": stdin), read strictly: invalid bytes are an error naming the offset."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a {what}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{'stdin' if path == '-' else path} is not valid UTF-8 (byte {e.start})") from None


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompt(s) of `generate`: the argument, --file (one prompt) or --batch (one per line); - is stdin."""
    from gemmakit.tokenizer import check_utf8

    given = [o for o, v in (("a PROMPT", args.prompt), ("--file", args.file), ("--batch", args.batch))
             if v is not None]
    if len(given) != 1:
        raise UserError("give the prompt as an argument (- reads stdin), with --file or --batch"
                        + (f", not {' and '.join(given)}" if given else ""))
    if args.prompt is not None and args.prompt != "-":
        return [check_utf8(args.prompt, "the prompt")]
    if args.batch is None:  # a whole file is one prompt; an editor's final newline is not part of it
        text = _read_text(args.file or "-", "prompt file")
        return [text[:-1] if text.endswith("\n") else text]
    text = _read_text(args.batch, "batch file")
    lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]
    if empty := [n for n, line in enumerate(lines, 1) if not line]:
        raise ValueError(f"line {empty[0]} of {args.batch} is empty: --batch takes one prompt per line")
    return lines


def _completion_json(c) -> str:
    """One line of JSON: text, OpenAI's finish_reason and usage, and timings (seconds, tokens per second)."""
    import json

    def rate(tokens: int, seconds: float) -> float | None:
        return round(tokens / seconds, 3) if tokens > 0 and seconds > 0 else None

    # The first new token comes out of the prefill: decoding made completion_tokens - 1 of them.
    return json.dumps({
        "text": c.text, "finish_reason": c.finish_reason,
        "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                  "total_tokens": c.prompt_tokens + c.completion_tokens},
        "timings": {"prefill_seconds": round(c.prefill_seconds, 6),
                    "prefill_tokens_per_second": rate(c.prompt_tokens, c.prefill_seconds),
                    "decode_seconds": round(c.decode_seconds, 6),
                    "decode_tokens_per_second": rate(c.completion_tokens - 1, c.decode_seconds)},
    }, ensure_ascii=False)


def _add_image_args(s: argparse.ArgumentParser) -> None:
    from gemmakit.image import PanScan

    d = PanScan()
    s.add_argument("--pan-and-scan", action="store_true",
                   help="also show the model crops of wide or tall images (Gemma 3 4B+; off by default)")
    s.add_argument("--pan-and-scan-min-crop-size", type=int, default=d.min_crop_size, metavar="PX",
                   help=f"no crops if a crop's short side would be under PX pixels (default {d.min_crop_size})")
    s.add_argument("--pan-and-scan-max-crops", type=int, default=d.max_crops, metavar="N",
                   help=f"at most N crops per image (default {d.max_crops})")
    s.add_argument("--pan-and-scan-min-ratio", type=float, default=d.min_ratio, metavar="R",
                   help=f"crop only images with long side / short side >= R (default {d.min_ratio})")


def _pan_and_scan(args: argparse.Namespace):
    from gemmakit.image import PanScan

    _at_least("--pan-and-scan-min-crop-size", args.pan_and_scan_min_crop_size, 1)
    _at_least("--pan-and-scan-max-crops", args.pan_and_scan_max_crops, 2, " (cropping makes at least 2)")
    if not args.pan_and_scan_min_ratio > 0:
        raise UserError(f"--pan-and-scan-min-ratio must be > 0, got {args.pan_and_scan_min_ratio}")
    if not args.pan_and_scan:
        return None
    return PanScan(args.pan_and_scan_min_crop_size, args.pan_and_scan_max_crops, args.pan_and_scan_min_ratio)


def cmd_generate(args: argparse.Namespace) -> None:
    from gemmakit import hub, image, vision
    from gemmakit.engine import stream_text

    # Everything the user gave is checked before the weights load, and nothing is printed before an error.
    _check_sampling(args)
    scan = _pan_and_scan(args)
    prompts = _prompts(args)
    if args.image and len(prompts) > 1:
        raise UserError("--image works with one prompt, not with --batch")
    pixels, crops = None, []
    if args.image:  # read the images before loading weights: a bad file or a text-only model fails fast
        pixels, crops = image.load_images(args.image, hub.load_config(args.model), scan)
    _warn_if_ignored(args)
    model, tokenizer = _load(args)
    ids = [vision.prompt_ids(tokenizer.encode, model.config, p, crops) for p in prompts]  # <bos> + images + prompt
    chunks = stream_text(model, tokenizer, ids, args.max_new_tokens, stop=args.stop, images=pixels,
                         compile=_compile(args, model), **_sampling(args))  # raises here for a prompt too long for the context
    if args.json or args.batch is not None:  # whole texts, in input order
        done = [None] * len(prompts)
        for c in chunks:
            if c.completion is not None:
                done[c.index] = c.completion
        for prompt, c in zip(prompts, done):
            sys.stdout.write(_completion_json(c) + "\n" if args.json
                             else ("" if args.no_echo else prompt) + c.text + "\n")
        return
    # The first chunk before the echo: the prefill, and loading (or building, with a note on stderr) the
    # compiled step, come before any output, so that a note never lands in the middle of the text.
    first = next(chunks, None)
    if not args.no_echo:
        sys.stdout.write(prompts[0])
    _write_chunks(itertools.chain([first] if first else [], chunks), sys.stdout)
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from gemmakit import chat

    chat.run(args)


def cmd_convert(args: argparse.Namespace) -> None:
    from gemmakit import hub

    out = _output_dir(args.out)  # before reading a single tensor
    source = hub.default_gguf() if hub.is_default(args.gguf) else _input_file(args.gguf, "GGUF file")
    print(f"wrote {hub.convert(source, out)}")


def cmd_perplexity(args: argparse.Namespace) -> None:
    from gemmakit import hub
    from gemmakit.evaluate import perplexity

    _at_least("--context", args.context, 2, " (<bos> + one token)")
    text = _read_text(args.file, "text file")
    if not text:
        raise UserError(f"{args.file} is empty: no tokens to score")
    if args.context is not None:  # the model's context length, from its config: no weights loaded yet
        config = hub.load_config(args.model)
        if args.context > config.max_seq_len:
            raise UserError(f"--context {args.context} exceeds {config.name}'s context length of "
                            f"{config.max_seq_len} tokens")
    model, tokenizer = _load(args)
    # Plain text: a literal "<bos>" or "<start_of_turn>" in the file is scored as the text it is.
    result = perplexity(model, tokenizer.encode(text, add_bos=False, parse_special=False), tokenizer.bos_id,
                        args.context)
    name = "stdin" if args.file == "-" else Path(args.file).name
    print(f"perplexity {result.perplexity:.4f}  tokens {result.tokens}  windows {result.windows}  "
          f"context {result.context}  ({name})")


def cmd_data(args: argparse.Namespace) -> None:
    from gemmakit.train import commands

    commands.data_prepare(args)


def cmd_train(args: argparse.Namespace) -> None:
    from gemmakit.train import commands

    commands.train_cmd(args)


def cmd_teacher_cache(args: argparse.Namespace) -> None:
    from gemmakit.train import commands

    commands.teacher_cache(args)


def cmd_distill(args: argparse.Namespace) -> None:
    from gemmakit.train import commands

    commands.distill(args)


def _add_training_parsers(sub) -> None:
    from gemmakit.train import commands

    default = "`default` (the embedded Gemma 3 270M)"
    s = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    s = s.add_parser("prepare", help="tokenize .txt/.jsonl files or folders into token shards")
    s.add_argument("inputs", nargs="+", help=".txt files, .jsonl files (a 'text' field per line) or folders")
    s.add_argument("--tokenizer", default=None, help="model whose tokenizer to use: GGUF file, HF directory or "
                   f"{default}; the default is {default}")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="documents held out for validation, by a hash of their name (default 0.1)")
    s.add_argument("--val-files", nargs="*", default=None,
                   help="hold out the documents of these file names instead (default: by --val-fraction)")
    s.add_argument("--chat", action="store_true", help="the inputs are conversations for `gemmakit sft`: .jsonl "
                   "lines {\"messages\": [{\"role\": ..., \"content\": ...}]}, rendered with the model's chat "
                   "template, with a loss mask on the model turns")
    s.add_argument("--seq-len", type=int, default=None, help="with --chat: conversations longer than this many "
                   "tokens are dropped and counted, never split (no default: --chat needs it)")
    s.add_argument("--on-error", choices=("skip", "fail"), default="fail", help="with --chat: a bad line (invalid "
                   "JSON, unknown role, turns out of order, empty conversation) stops the run (fail, default) or is "
                   "reported with its file:line and left out (skip)")
    s.set_defaults(func=cmd_data)

    s = sub.add_parser("train", help="train or fine-tune a model on prepared data")
    s.add_argument("--model", required=True, help="preset or .json/.toml config (random init), or weights to "
                   f"fine-tune: GGUF file, HF directory, hub id or {default}")
    commands.add_train_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("teacher-cache", help="run a teacher once and store k sampled logits per token")
    s.add_argument("--teacher", default=None, help=f"teacher model: GGUF file, HF directory, hub id or {default}; "
                   f"the default is {default}")
    s.add_argument("--data", required=True, help="directory written by `gemmakit data prepare`")
    s.add_argument("--out", required=True, help="cache directory (rerun the same command to resume)")
    s.add_argument("--k", type=int, default=256, help="sampled ids per token (default 256); the cache takes "
                   "k x 6 bytes per token")
    s.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="cache only the first N training tokens (whole sequences), bounding the cache to "
                        "N x k x 6 bytes; distillation from it trains on those (default: the whole split)")
    s.add_argument("--seq-len", type=int, default=256,
                   help="tokens per sequence; must equal the distillation run's --seq-len (default 256)")
    s.add_argument("--batch-size", type=int, default=4, help="sequences per teacher forward (default 4)")
    s.add_argument("--mask-documents", action="store_true", help="must equal the distillation run's (default: off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--bf16", action="store_true", help="bf16 autocast for the teacher (default: off)")
    s.set_defaults(func=cmd_teacher_cache)

    s = sub.add_parser("distill", help="train a student from a teacher (online) or a teacher cache")
    s.add_argument("--model", required=True, help="student: preset or .json/.toml config (random init), or weights: "
                   f"GGUF file, HF directory, hub id or {default}")
    commands.add_distill_options(s)
    commands.add_train_options(s)
    s.set_defaults(func=cmd_distill)

    s = sub.add_parser("sft", help="supervised fine-tuning on chat data (loss on the model turns only)")
    s.add_argument("--model", required=True, help=f"model to fine-tune: GGUF file, HF directory, hub id or {default}")
    commands.add_train_options(s)
    from gemmakit.train.sft import add_sft_options

    add_sft_options(s)  # --teacher (distillation during SFT), --on-policy, ...
    s.set_defaults(func=commands.sft_cmd, seq_len=None)  # None: the --seq-len the chat data was prepared with
    for action in s._actions:
        if action.dest == "seq_len":
            action.help = "tokens per packed sequence (default: the data's --seq-len)"
        if action.dest == "mask_documents":
            action.help = "always on for chat data (conversations are packed with document masking)"

    from gemmakit.train import merge

    s = sub.add_parser("merge", help="merge checkpoints: average, task arithmetic, SLERP, interpolation to the base")
    merge.add_merge_options(s)
    s.set_defaults(func=merge.merge_cmd)

    s = sub.add_parser("merge-adapter", help="fold a PEFT LoRA adapter into a model and save it")
    merge.add_merge_adapter_options(s)
    s.set_defaults(func=merge.merge_adapter_cmd)


_THREADS_HELP = "threads torch computes with, set before anything loads (default: torch's own, one per core)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmakit", description="Run, fine-tune and distill Gemma 1/2/3 models.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors (also after the command)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help=_THREADS_HELP)
    p.add_argument("--version", action="version", version=f"gemmakit {_version()}",
                   help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="config, parameter counts and memory of a model")
    s.add_argument("model", help=f"preset name ({', '.join(CONFIGS)}), GGUF file, HF directory, hub id, or "
                                 "`default` for the embedded Gemma 3 270M")
    s.add_argument("--context", type=int, default=None,
                   help="tokens per sequence to plan for, >= 1 (default: the model's context length)")
    s.add_argument("--batch", type=int, default=None,
                   help="sequences served at once (default 1); with --train, sequences per micro-batch per rank "
                        "(default 8, as `gemmakit train --batch-size`)")
    s.add_argument("--kv-dtype", default=None, choices=["bf16", "fp32", "int8"], help="KV cache dtype (default bf16)")
    t = s.add_argument_group("training memory (--train; the other options are `gemmakit train`'s)")
    t.add_argument("--train", action="store_true",
                   help="plan the memory of a training step per rank instead (gemmakit/train/memory.py), and the "
                        "fewest accelerators of --gpu-memory that fit full fine-tuning, LoRA and QLoRA")
    t.add_argument("--gpus", type=int, default=None, help="ranks under torchrun, sharded with FSDP2 (default 1)")
    t.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256)")
    t.add_argument("--lora-rank", type=int, default=None, help="plan LoRA adapters of this rank (default: full "
                   "fine-tuning; the fewest-accelerators line takes rank 16)")
    t.add_argument("--quantize-base", choices=("int8", "int4"), default=None, help="QLoRA, with --lora-rank")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in the backward")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (the weights stay fp32)")
    t.add_argument("--chunk", type=int, default=None, help="tokens per LM-head chunk in the loss (default 1024)")
    t.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory of one accelerator, e.g. 80GB, 24GB (GB = GiB; default 80GB)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="continue a prompt, streaming the text")
    s.add_argument("prompt", nargs="?", default=None,
                   help="the text to continue (raw: no chat template; - reads it from stdin)")
    s.add_argument("-f", "--file", default=None, metavar="PATH",
                   help="read the prompt from a UTF-8 file (- for stdin; a final newline is dropped)")
    s.add_argument("--batch", default=None, metavar="FILE",
                   help="one prompt per line of a UTF-8 file (- for stdin), generated as one batch; the "
                        "results are printed in input order, each ending in a newline (--json: one per line)")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object instead of streaming: text, finish_reason (stop/length), usage "
                        "(token counts) and timings (one object per line with --batch)")
    s.add_argument("--no-echo", action="store_true", help="print only the new text, not the prompt")
    s.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable; Gemma 3 4B+). Each goes where the prompt says "
                        "<start_of_image>, or before the text if it says nothing")
    _add_image_args(s)
    _add_model_args(s)
    _add_compile_arg(s)
    _add_sampling_args(s, 64)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="multi-turn chat with the model's turn template (reads stdin if not a terminal)")
    s.add_argument("--system", default=None, help="system prompt (Gemma 3 only; default: none)")
    _add_image_args(s)
    _add_model_args(s)
    s._option_string_actions["--adapter"].help = (
        "a PEFT LoRA adapter directory, folded into the weights at load (default: for the embedded model, "
        "gemmakit's chat adapter shipped with the package; none for other models)")
    s.add_argument("--no-adapter", action="store_true", help="chat with the raw embedded base, without gemmakit's "
                   "shipped chat adapter")
    _add_compile_arg(s)
    _add_sampling_args(s, 256)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("convert", help="convert a GGUF file to an HF directory (safetensors + tokenizer)")
    s.add_argument("gguf", help="input .gguf file, or `default` for the embedded Gemma 3 270M's")
    s.add_argument("out", help="output directory (must not exist or be empty)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("perplexity", help="perplexity of a model on a UTF-8 text file",
                       description="Perplexity of a model on a UTF-8 text file. It runs the model over windows of "
                                   "the text in chunks (a prefill, no token-by-token decoding), eagerly: there is "
                                   "no decode step to compile, hence no --compile. With --quantize the products "
                                   "use torch's int8/int4 kernels.")
    s.add_argument("file", help="UTF-8 text file to score (- reads stdin); tokenized as plain text, no <bos>")
    s.add_argument("--context", type=int, default=None,
                   help="window length in tokens, >= 2 (non-overlapping; default: the whole file if it fits, "
                        "else the model's context length)")
    _add_model_args(s)
    s.set_defaults(func=cmd_perplexity)
    _add_training_parsers(sub)
    from gemmakit.train import rl_commands

    rl_commands.add_parsers(sub)  # reward, rl, warm, warp
    from gemmakit.eval import commands as eval_commands

    eval_commands.add_parsers(sub)  # eval, memorization
    from gemmakit import export

    export.add_parser(sub)
    from gemmakit.train import qat
    qat.add_parser(sub)  # qat
    from gemmakit.serve import commands as serve_commands

    serve_commands.add_parser(sub)  # serve
    _add_debug_everywhere(p)
    _add_everywhere(p, "--threads", type=int, default=argparse.SUPPRESS, metavar="N", help=_THREADS_HELP)
    return p


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--debug` after any (sub)command too."""
    _add_everywhere(parser, "--debug", action="store_true", default=argparse.SUPPRESS,
                    help="show full tracebacks on errors")


def _add_everywhere(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """`flag` after any (sub)command too (kwargs: its add_argument keywords, default SUPPRESS so that
    absent there, it leaves the top-level value alone)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(s): s for s in action.choices.values()}.values():  # aliases share a parser
                if flag not in sub._option_string_actions:
                    sub.add_argument(flag, **kwargs)
                _add_everywhere(sub, flag, **kwargs)


def _set_threads(n: int | None) -> None:
    """--threads: torch's intra-op threads, set before anything is loaded or computed."""
    if n is None:
        return
    _at_least("--threads", n, 1)
    import torch

    torch.set_num_threads(n)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gemmakit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _message(e: BaseException) -> str:
    """The error as one line for the user; an OSError's raw "[Errno 21] Is a directory: 'x'" becomes
    "x: is a directory" (a path the user gave, or one the code reached, named without errno noise)."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror and text.startswith("[Errno"):
        why = e.strerror[:1].lower() + e.strerror[1:]
        return f"{e.filename}: {why}" if e.filename is not None else why
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _set_threads(args.threads)
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, OSError) as e:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: one message
            print(f"gemmakit: error: {_message(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
