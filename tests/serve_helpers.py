"""Helpers of the server tests: tiny checkpoints that write readable text, and `gemmakit serve`'s app
running on uvicorn in a thread on a free loopback port (the same load path as the command)."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from chat_vocab import gemma3_vocab
from conftest import random_model, tiny_config
from gemmakit import weights
from gemmakit.config import VisionConfig
from gemmakit.tokenizer import Tokenizer

VOCAB, CONTEXT = 400, 256
TINY_VISION = VisionConfig(image_size=32, patch_size=4, hidden_size=24, n_layers=2, n_heads=2, intermediate_size=40,
                           tokens_per_image=16)


def tiny_dir(path: Path, generation: int = 3, vision: bool = False, seed: int = 3) -> Path:
    """An HF directory of a tiny random Gemma (400-piece Gemma 3-style vocabulary: <start_of_turn> 105,
    <end_of_turn> 106) whose embedding rows below the "\\n" piece are zero, so that greedy decoding picks
    letters and newlines and never a control token: replies run to max_tokens unless a stop string ends them."""
    config = tiny_config(generation).replace(vocab_size=VOCAB, max_seq_len=CONTEXT)
    if vision:
        config = config.replace(vision=TINY_VISION, image_token_id=112)  # <image_soft_token> of the tiny vocab
    model = random_model(config, seed=seed)
    vocab = gemma3_vocab()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and "vision" not in name:  # larger projections: less of an echo of the last token
                p.normal_(0, 0.3, generator=g)
        model.model.embed_tokens.weight[:vocab.tokens.index("\n")] = 0.0
    weights.save(model, path)
    Tokenizer.from_gguf_vocab(vocab).save(path, generation=generation)
    return path


def serve_args(model: str | Path, *extra: str) -> argparse.Namespace:
    """`gemmakit serve --model MODEL --no-compile EXTRA...` parsed by the command's own parser."""
    from gemmakit.serve import commands

    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", "--model", str(model), "--no-compile", *extra])


class Running:
    """The app of `args` (see serve_args) on uvicorn in a thread, at `self.url`, model loaded."""

    def __init__(self, args: argparse.Namespace, **service) -> None:
        import uvicorn

        from gemmakit.serve import commands
        from gemmakit.serve.app import Service, create_app

        self.service = Service(**service)
        commands.load_service(args, self.service)
        sock = commands.bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    @property
    def scheduler(self):
        return self.service.scheduler

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def idle(self, timeout: float = 10.0) -> dict:
        """The scheduler's stats once nothing runs or waits (AssertionError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while (stats := self.scheduler.stats())["running"] or stats["queued"]:
            assert time.monotonic() < deadline, f"slots still busy: {stats}"
            time.sleep(0.005)
        return stats

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.scheduler.close(drain=False, timeout=10)
