"""`gemmakit chat`: multi-turn chat in the model's turn template, typed at a prompt or piped in.

Commands start with `/` and are never sent to the model. Every turn re-renders the whole conversation
(message content as plain text: a typed `<end_of_turn>` stays text, see tokenizer.chat_segments) and
streams the reply through the same engine path as `gemmakit generate`. Piped stdin gives a transcript
on stdout: `> message`, the reply, a blank line. On the embedded model the chat folds in gemmakit's
shipped chat adapter unless --no-adapter (`chat_adapter`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from gemmakit import cli

_CHAT_COMMANDS = """commands (never sent to the model):
  /image PATH    attach an image to your next message (Gemma 3 4B and larger)
  /reset         forget the conversation (the --system prompt stays)
  /help          this list
  /quit, /exit   end the chat (Ctrl-D too)
  //TEXT         send TEXT that starts with one /"""

# Words that Google and GGUF publishers put in the names of instruction-tuned checkpoints
# (gemma-3-1b-it, gemma-2-2b-it-Q4_K_M.gguf, ...-instruct, ...-chat).
_TUNED_WORDS = {"it", "instruct", "chat"}


def looks_like_base_model(spec: str | None) -> bool:
    """True if SPEC (a --model value) looks like a base (pretrained) model, not an instruction-tuned one.

    The embedded default is Google's base Gemma 3 270M. Any other model counts as tuned when a word of
    its name says so (it, instruct or chat, split at any non-alphanumeric character) in its file or
    folder name, the folder above it (OUT/model) or its hub id. The chat template cannot tell: base
    checkpoints ship it too.
    """
    from gemmakit import hub

    if hub.is_default(spec):
        return True
    words = set(re.split(r"[^a-z0-9]+", " ".join(Path(spec).parts[-2:]).lower()))
    return not words & _TUNED_WORDS


def chat_adapter(args: argparse.Namespace) -> str | None:
    """The adapter `chat` folds into the model: --adapter DIR if given; for the embedded model, gemmakit's
    shipped chat adapter (adapters.default_adapter) unless --no-adapter; else None.

    Checked before any weights load: --no-adapter with --adapter is a ValueError. A shipped adapter that
    does not fit the embedded model (another embedded model than it was trained for) is left out with a
    warning on stderr rather than failing the chat.
    """
    from gemmakit import hub
    from gemmakit.adapters import check_adapter, default_adapter
    from gemmakit.model import build

    if getattr(args, "no_adapter", False):
        if args.adapter:
            raise ValueError("--no-adapter and --adapter DIR contradict each other: give one")
        return None
    if args.adapter or not hub.is_default(args.model) or (shipped := default_adapter()) is None:
        return args.adapter
    problems = check_adapter(build(hub.load_config(args.model), "meta"), shipped)
    if problems:
        print(f"gemmakit: warning: gemmakit's chat adapter does not fit {hub.EMBEDDED} ({problems[0]}); "
              "chatting with the raw base", file=sys.stderr)
        return None
    return str(shipped)


def _chat_lines(interactive: bool):
    """The user's lines, without the newline: typed at a "> " prompt, or read from piped stdin.

    A line that is not valid UTF-8 comes as a ValueError naming it and the byte offset within it
    (the chat reports it and goes on). Piped stdin is read as bytes and decoded strictly.
    """
    from gemmakit.tokenizer import check_utf8

    if interactive:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)  # end the prompt's line
                return
            except UnicodeDecodeError as e:  # a strict terminal decoder: the line is what it decoded
                yield ValueError(f"your message is not valid UTF-8 (byte {e.start}); it was not sent")
                continue
            try:
                yield check_utf8(line, "your message")  # a surrogateescape decoder hands over surrogates
            except ValueError as e:
                yield ValueError(f"{e}; it was not sent")
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    n = 0
    while raw := stream.readline():
        n += 1
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ValueError(f"line {n} of stdin is not valid UTF-8 (byte {e.start}); it was not sent")
                continue
        try:
            yield check_utf8(raw.rstrip("\r\n"), f"line {n} of stdin")
        except ValueError as e:
            yield ValueError(f"{e}; it was not sent")


def run(args: argparse.Namespace) -> None:
    """`gemmakit chat`: a REPL over the engine, with the model's turn template (see the module docstring)."""
    import torch

    from gemmakit import hub, image, vision
    from gemmakit.tokenizer import chat_segments, check_utf8

    # Everything the user gave is checked before the weights load.
    cli._check_sampling(args)
    cli._pan_and_scan(args)
    if args.system is not None:
        check_utf8(args.system, "--system")
        # Gemma 1/2 have no system role: refused now, not after loading and the first message.
        chat_segments([{"role": "system", "content": args.system}, {"role": "user", "content": "x"}],
                      hub.load_config(args.model).generation)
    cli._warn_if_ignored(args)
    adapter = chat_adapter(args)
    shipped = adapter is not None and args.adapter is None
    args = argparse.Namespace(**{**vars(args), "adapter": adapter})
    model, tokenizer = cli._load(args)
    interactive = sys.stdin.isatty()
    if shipped:
        print(f"gemmakit: note: {hub.EMBEDDED} base with gemmakit's chat adapter (LoRA tuned on chatterbot-corpus's "
              "short English dialogs, BSD-3-Clause): it answers briefly and ends its turns, but it is a 270M model "
              "and often wrong on facts; --no-adapter chats with the raw base", file=sys.stderr)
    elif looks_like_base_model(args.model):
        what = (f"{hub.EMBEDDED} is a base model" if hub.is_default(args.model) else
                f"{args.model} looks like a base model (its name has no it, instruct or chat)")
        print(f"gemmakit: note: {what}, not instruction-tuned: it continues text rather than answering, so its "
              "chat replies are poor; an instruction-tuned Gemma (named -it, e.g. google/gemma-3-270m-it) chats",
              file=sys.stderr)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    # Images of the whole conversation (the prompt is re-rendered every turn) and those for the next turn.
    pixels: list = []
    crops: list[int] = []
    attached: list[dict] = []
    if interactive:
        print("chat with the model; /help lists the commands, /quit or Ctrl-D ends", file=sys.stderr)
    for line in _chat_lines(interactive):
        if isinstance(line, ValueError):
            print(f"gemmakit: error: {line}", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                print("(chat ended)", file=sys.stderr)
                break
            if command == "/help":
                print(_CHAT_COMMANDS, file=sys.stderr)
            elif command == "/reset":
                messages = messages[:1] if args.system else []
                pixels, crops, attached = [], [], []
                print("(conversation cleared" + ("; the system prompt stays)" if args.system else ")"), file=sys.stderr)
            elif command == "/image":
                if not rest.strip():
                    print("gemmakit: error: /image needs a path: /image PATH", file=sys.stderr)
                    continue
                try:
                    views, n = image.load_images([rest.strip()], model.config, cli._pan_and_scan(args))
                except (ValueError, OSError) as e:  # a bad image ends this command, not the chat
                    print(f"gemmakit: error: {e}", file=sys.stderr)
                    continue
                pixels.append(views)
                crops += n
                attached.append({"type": "image"})
                print(f"(image attached{f' with {n[0]} crops' if n[0] else ''}; now type your message)",
                      file=sys.stderr)
            else:
                print(f"gemmakit: error: unknown command {command} (not sent to the model); /help lists the "
                      "commands, and // at the start sends a message that begins with /", file=sys.stderr)
            continue
        if line.startswith("//"):
            line = line[1:]
        messages.append({"role": "user", "content": attached + [{"type": "text", "text": line}]})
        attached = []
        ids = vision.chat_prompt_ids(tokenizer, model.config, messages, crops)  # typed text stays plain text
        room = model.config.max_seq_len - len(ids)
        if room < 1:
            attached = [part for part in messages.pop()["content"] if part["type"] == "image"]  # not sent
            print(f"gemmakit: error: the conversation ({len(ids)} tokens) no longer fits the context length of "
                  f"{model.config.max_seq_len} tokens; /reset starts over", file=sys.stderr)
            continue
        if not interactive:  # piped: a transcript, each turn marked, so the replies can be told apart
            sys.stdout.write(f"> {line}\n")
        # A long conversation gets a shorter reply rather than an error.
        turn = argparse.Namespace(**{**vars(args), "max_new_tokens": min(args.max_new_tokens, room)})
        reply = cli._stream(model, tokenizer, ids, turn, images=torch.cat(pixels) if pixels else None)
        sys.stdout.write("\n" if interactive else "\n\n")
        sys.stdout.flush()
        messages.append({"role": "model", "content": reply})
