"""`gemmakit` command line: argparse subcommands, each a small function that consumes the library.

Errors a user can cause (bad file, unknown name, too-long prompt, ...) end in one line naming the
problem; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from gemmakit.config import CONFIGS, Config, get_config


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


def cmd_info(args: argparse.Namespace) -> None:
    from gemmakit import hub

    config = hub.load_config(args.model)  # a preset, GGUF file, HF directory or hub id; no weights loaded
    from gemmakit.engine import format_plan, memory_plan

    plan = memory_plan(config, args.context or config.max_seq_len, args.batch, args.kv_dtype)  # checks first
    print(describe(config))
    print(format_plan(plan, _fmt_bytes))


# -- running a model ------------------------------------------------------------------------------

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default=None,
                   help="GGUF file, HF directory or hub id (default: the embedded Gemma 3 270M)")
    s.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="compute dtype (default float32)")
    s.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization: int8 per channel or int4 in groups of 32 (default: none)")


def _add_sampling_args(s: argparse.ArgumentParser, max_new_tokens: int) -> None:
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="keep the smallest set reaching probability p")
    s.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")


def _load(args: argparse.Namespace):
    import torch

    from gemmakit import hub

    model, tokenizer = hub.load(args.model, dtype=getattr(torch, _DTYPES[args.dtype]))
    if args.quantize:
        from gemmakit.quant import quantize

        quantize(model, args.quantize)
    return model, tokenizer


def _stream(model, tokenizer, ids: list[int], args: argparse.Namespace, out=None, images=None) -> str:
    """Generate from `ids`, writing text to `out` as it comes; return the text (stop token excluded)."""
    from gemmakit.engine import generate

    out = out or sys.stdout
    decoder, pieces = tokenizer.stream(), []
    for (token,) in generate(model, [ids], args.max_new_tokens, stop_ids=tokenizer.stop_ids,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             images=images):
        if token is None or token in tokenizer.stop_ids:
            break
        if text := decoder.push(token):
            pieces.append(text)
            out.write(text)
            out.flush()
    pieces.append(tail := decoder.flush())
    out.write(tail)
    out.flush()
    return "".join(pieces)


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

    if not args.pan_and_scan:
        return None
    return PanScan(args.pan_and_scan_min_crop_size, args.pan_and_scan_max_crops, args.pan_and_scan_min_ratio)


def cmd_generate(args: argparse.Namespace) -> None:
    from gemmakit import hub, image, vision

    pixels, crops = None, []
    if args.image:  # read the images before loading weights: a bad file or a text-only model fails fast
        pixels, crops = image.load_images(args.image, hub.load_config(args.model), _pan_and_scan(args))
    model, tokenizer = _load(args)
    ids = vision.prompt_ids(tokenizer.encode, model.config, args.prompt, crops)  # <bos> + images + prompt
    if not args.no_echo:
        sys.stdout.write(args.prompt)
    _stream(model, tokenizer, ids, args, images=pixels)
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    import torch

    from gemmakit import image, vision
    from gemmakit.tokenizer import render_chat

    model, tokenizer = _load(args)
    interactive = sys.stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    # Images of the whole conversation (the prompt is re-rendered every turn) and those for the next turn.
    pixels: list = []
    crops: list[int] = []
    attached: list[dict] = []
    if interactive:
        print("chat with the model; /image PATH attaches an image to your next message, /reset starts over, "
              "/exit or Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            pixels, crops, attached = [], [], []
            continue
        if line.startswith("/image"):
            try:
                views, n = image.load_images([line[len("/image"):].strip()], model.config, _pan_and_scan(args))
            except (ValueError, OSError) as e:  # a bad image ends this command, not the chat
                print(f"gemmakit: error: {e}", file=sys.stderr)
                continue
            pixels.append(views)
            crops += n
            attached.append({"type": "image"})
            print(f"(image attached{f' with {n[0]} crops' if n[0] else ''}; now type your message)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": attached + [{"type": "text", "text": line}]})
        attached = []
        ids = vision.prompt_ids(lambda text: tokenizer.encode(text, add_bos=False), model.config,
                                render_chat(messages, model.config.generation), crops)
        room = model.config.max_seq_len - len(ids)
        if room < 1:
            raise ValueError(f"the conversation ({len(ids)} tokens) no longer fits the context length of "
                             f"{model.config.max_seq_len} tokens; /reset starts over")
        # A long conversation gets a shorter reply rather than an error.
        turn = argparse.Namespace(**{**vars(args), "max_new_tokens": min(args.max_new_tokens, room)})
        reply = _stream(model, tokenizer, ids, turn, images=torch.cat(pixels) if pixels else None)
        sys.stdout.write("\n")
        messages.append({"role": "model", "content": reply})


def cmd_convert(args: argparse.Namespace) -> None:
    from gemmakit import hub

    out = hub.convert(args.gguf, args.out)
    print(f"wrote {out}")


def cmd_perplexity(args: argparse.Namespace) -> None:
    from pathlib import Path

    from gemmakit.evaluate import perplexity

    path = Path(args.file)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such text file: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text (byte {e.start})") from None
    model, tokenizer = _load(args)
    result = perplexity(model, tokenizer.encode(text, add_bos=False), tokenizer.bos_id, args.context)
    print(f"perplexity {result.perplexity:.4f}  tokens {result.tokens}  windows {result.windows} of "
          f"{result.context}  ({path.name})")


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

    s = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    s = s.add_parser("prepare", help="tokenize .txt/.jsonl files or folders into token shards")
    s.add_argument("inputs", nargs="+", help=".txt files, .jsonl files (a 'text' field per line) or folders")
    s.add_argument("--tokenizer", default=None, help="model whose tokenizer to use (default: embedded Gemma 3 270M)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--val-fraction", type=float, default=0.1, help="documents held out for validation (by hash)")
    s.add_argument("--val-files", nargs="*", default=None, help="hold out these file names instead")
    s.set_defaults(func=cmd_data)

    s = sub.add_parser("train", help="train or fine-tune a model on prepared data")
    s.add_argument("--model", required=True, help="preset or .json/.toml config (random init), or weights to fine-tune")
    commands.add_train_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("teacher-cache", help="run a teacher once and store k sampled logits per token")
    s.add_argument("--teacher", default=None, help="teacher model (default: embedded Gemma 3 270M)")
    s.add_argument("--data", required=True, help="directory written by `gemmakit data prepare`")
    s.add_argument("--out", required=True, help="cache directory (rerun the same command to resume)")
    s.add_argument("--k", type=int, default=256, help="sampled ids per token (default 256)")
    s.add_argument("--seq-len", type=int, default=256, help="must equal the distillation run's --seq-len")
    s.add_argument("--batch-size", type=int, default=4, help="sequences per teacher forward")
    s.add_argument("--mask-documents", action="store_true", help="must equal the distillation run's")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--bf16", action="store_true", help="bf16 autocast for the teacher")
    s.set_defaults(func=cmd_teacher_cache)

    s = sub.add_parser("distill", help="train a student from a teacher (online) or a teacher cache")
    s.add_argument("--model", required=True, help="student: preset or .json/.toml config (random init), or weights")
    commands.add_distill_options(s)
    commands.add_train_options(s)
    s.set_defaults(func=cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmakit", description="Run, fine-tune and distill Gemma 1/2/3 models.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="config, parameter counts and memory of a model")
    s.add_argument("model", help=f"preset name ({', '.join(CONFIGS)}), GGUF file, HF directory or hub id")
    s.add_argument("--context", type=int, default=None, help="tokens per sequence to plan for (default: the model's)")
    s.add_argument("--batch", type=int, default=1, help="sequences served at once (default 1)")
    s.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp32", "int8"], help="KV cache dtype (default bf16)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="continue a prompt, streaming the text")
    s.add_argument("prompt")
    s.add_argument("--no-echo", action="store_true", help="print only the new text, not the prompt")
    s.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable; Gemma 3 4B+). Each goes where the prompt says "
                        "<start_of_image>, or before the text if it says nothing")
    _add_image_args(s)
    _add_model_args(s)
    _add_sampling_args(s, 64)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="multi-turn chat with the model's turn template (reads stdin if not a terminal)")
    s.add_argument("--system", default=None, help="system prompt (Gemma 3 only)")
    _add_image_args(s)
    _add_model_args(s)
    _add_sampling_args(s, 256)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("convert", help="convert a GGUF file to an HF directory (safetensors + tokenizer)")
    s.add_argument("gguf", help="input .gguf file")
    s.add_argument("out", help="output directory (must not exist or be empty)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("perplexity", help="perplexity of a model on a UTF-8 text file")
    s.add_argument("file")
    s.add_argument("--context", type=int, default=None,
                   help="window length in tokens (non-overlapping; default: the whole file if it fits)")
    _add_model_args(s)
    s.set_defaults(func=cmd_perplexity)
    _add_training_parsers(sub)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, OSError) as e:
        if args.debug:
            raise
        print(f"gemmakit: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
