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
    print(describe(get_config(args.model)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmakit", description="Run, fine-tune and distill Gemma 1/2/3 models.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="config, parameter counts and memory of a model")
    s.add_argument("model", help=f"preset name ({', '.join(CONFIGS)})")
    s.set_defaults(func=cmd_info)

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
