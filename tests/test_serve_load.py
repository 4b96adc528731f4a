"""Load test of `gemmakit serve` (issue 16): a server process with a tiny model on loopback, 32 concurrent
streaming clients, 200 requests of mixed lengths on both endpoints (multi-turn chats among them), some
clients leaving mid-stream. Checks: no server error of any kind, every completed reply equal token for
token to the same prompt decoded greedily alone, resident memory after the run within 5% of what it was
after a 32-request warm-up, no slot left busy. Bounded: it stops by itself (about a minute on 2 cores)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from serve_helpers import CONTEXT, tiny_dir
from gemmakit.engine import generate
from gemmakit.hub import load
from gemmakit.tokenizer import encode_chat

CLIENTS, REQUESTS, WARMUP = 32, 200, 32
WORDS = ["the", "thesis", "is", "a", "heat", "on", "tin", "nest", "this", "that", "sea", "ease", "\n"]

pytestmark = pytest.mark.slow


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def make_requests(n: int, seed: int, tok) -> list[dict]:
    """n request specs: endpoint, body (greedy, streamed, token ids in the logprobs), prompt ids, and after
    how many chunks the client leaves (None: it reads to the end)."""
    rng = random.Random(seed)
    out = []
    history: list[dict] = []  # a conversation that grows, turn after turn (the scheduler may reuse its prefix)
    for i in range(n):
        max_tokens = rng.choice([1, 2, 5, 16, 40, 80, 120])
        text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 10, 30, 60])))
        if rng.random() < 0.5:
            ids = tok.encode(text)
            body = {"prompt": ids if rng.random() < 0.5 else text, "logprobs": 0}
            endpoint = "completions"
        else:
            messages = [*history, {"role": "user", "content": text}] if history and rng.random() < 0.5 else \
                [{"role": "user", "content": text}]
            ids = encode_chat(tok, messages, 3)
            if len(ids) + max_tokens > CONTEXT:
                messages = [{"role": "user", "content": text}]
                ids = encode_chat(tok, messages, 3)
            body = {"messages": messages, "logprobs": True}
            endpoint = "chat/completions"
        max_tokens = min(max_tokens, CONTEXT - len(ids))  # every request fits: none is refused
        body.update(max_tokens=max_tokens, temperature=0, stream=True, return_tokens_as_token_ids=True,
                    stream_options={"include_usage": True})
        leave = rng.choice([1, 3, 8]) if rng.random() < 0.15 and max_tokens > 8 else None
        out.append({"i": i, "endpoint": endpoint, "body": body, "ids": ids, "leave": leave})
    return out


def chunk_ids(endpoint: str, chunk: dict) -> list[int]:
    if not chunk.get("choices") or chunk["choices"][0].get("logprobs") is None:
        return []
    lp = chunk["choices"][0]["logprobs"]
    tokens = lp["tokens"] if endpoint == "completions" else [e["token"] for e in lp["content"]]
    return [int(t.removeprefix("token_id:")) for t in tokens]


async def run_one(client: httpx.AsyncClient, url: str, spec: dict) -> dict:
    result = {"spec": spec, "ids": [], "text": "", "status": None, "errors": [], "usage": None, "finish": None}
    chunks = 0
    async with client.stream("POST", f"{url}/v1/{spec['endpoint']}", json=spec["body"]) as r:
        result["status"] = r.status_code
        if r.status_code != 200:
            result["errors"].append((await r.aread()).decode())
            return result
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result["errors"].append(chunk["error"])
                continue
            chunks += 1
            result["ids"] += chunk_ids(spec["endpoint"], chunk)
            if chunk.get("usage"):
                result["usage"] = chunk["usage"]
            for choice in chunk.get("choices", []):
                result["finish"] = choice.get("finish_reason") or result["finish"]
            if spec["leave"] is not None and chunks >= spec["leave"]:
                result["left"] = True
                return result  # leaving the block closes the connection mid-stream
    return result


async def run_all(url: str, specs: list[dict]) -> list[dict]:
    queue: asyncio.Queue = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            while not queue.empty():
                results.append(await run_one(client, url, queue.get_nowait()))
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return results


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_idle(url: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["gemmakit_num_requests_running"] == 0 and m["gemmakit_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"slots still busy: {m}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp("load") / "tiny-gemma3")


def test_load(model_dir):
    model, tok = load(str(model_dir))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "--threads", "1", "serve", "--model",
                               str(model_dir), "--no-compile", "--port", "0", "--max-concurrent", "8"],
                              stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    try:
        url = None
        for line in server.stderr:
            log.append(line)
            url = url or (m.group(1) if (m := re.search(r"listening on (http://\S+);", line)) else None)
            if "gemmakit: serving" in line:
                break
        assert url, "".join(log)
        # Keep reading the log (uvicorn's access lines): a full pipe would block the server.
        reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
        reader.start()
        asyncio.run(run_all(url, make_requests(WARMUP, 1, tok)))
        wait_idle(url)
        warm = rss_kib(server.pid)
        start = time.monotonic()
        results = asyncio.run(run_all(url, make_requests(REQUESTS, 2, tok)))
        took = time.monotonic() - start
        after = wait_idle(url)
        rss = rss_kib(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        reader.join(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    assert len(results) == REQUESTS
    # No server error of any kind: every status 200, no error event, no traceback in the log.
    assert not [(r["status"], r["errors"]) for r in results if r["status"] != 200 or r["errors"]]
    assert not [line for line in log if "Traceback" in line or "ERROR" in line], "".join(log)
    left = [r for r in results if r.get("left")]
    done = [r for r in results if not r.get("left")]
    assert 10 <= len(left) <= 60 and done
    # Every completed reply is the greedy output of its prompt decoded alone, token for token.
    t_ref = time.monotonic()
    reference: dict[tuple, list[int]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and a busy machine's spinning threads are slow
    try:
        for r in done:
            spec = r["spec"]
            key = (tuple(spec["ids"]), spec["body"]["max_tokens"])
            if key not in reference:
                reference[key] = [t for (t,) in generate(model, [spec["ids"]], key[1], stop_ids=tok.stop_ids)
                                  if t is not None]
    finally:
        torch.set_num_threads(threads)
    for r in done:
        spec = r["spec"]
        key = (tuple(spec["ids"]), spec["body"]["max_tokens"])
        assert r["ids"] == reference[key], f"request {spec['i']} differs from its greedy output"
        assert r["usage"] == {"prompt_tokens": len(spec["ids"]), "completion_tokens": len(r["ids"]),
                              "total_tokens": len(spec["ids"]) + len(r["ids"])}
        assert r["finish"] in ("length", "stop")
    # Nothing stays busy; the cancelled ones were counted as such; memory did not grow with the requests.
    assert after["gemmakit_num_requests_running"] == 0 and after["gemmakit_num_requests_waiting"] == 0
    errors = {k: v for k, v in after.items() if k.startswith("gemmakit_requests_total")
              and not re.search(r'outcome="(length|stop|disconnected|cancelled)"', k)}
    assert not errors
    assert rss <= 1.05 * warm, f"resident memory grew from {warm} KiB to {rss} KiB"
    print(f"\n{REQUESTS} requests ({len(left)} left mid-stream) in {took:.1f} s; RSS {warm} -> {rss} KiB; "
          f"reference {time.monotonic() - t_ref:.1f} s")
