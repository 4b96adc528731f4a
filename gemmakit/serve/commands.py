"""`gemmakit serve`: the OpenAI-compatible server on uvicorn, behind cli.py's parser.

The socket is bound and the server answers at once (503 "loading" until the weights are in); the model
loads on a thread. SIGTERM or Ctrl-C drains: new requests get 503, running ones finish, then the
process exits (a second signal exits at once, cancelling what still runs).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path


def add_parser(sub) -> None:
    """Register `serve` on cli.py's subparsers (its model, compile and sampling-free options)."""
    from gemmakit import cli

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /",
                       description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models), with /health, /metrics (Prometheus) and a chat "
                                   "page at /. Concurrent requests share the model through continuous batching.")
    cli._add_model_args(s)
    cli._add_compile_arg(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the file or directory name; "
                        "gemma-3-270m for the embedded model); the --model SPEC as given is accepted too")
    s.add_argument("--max-concurrent", type=int, default=8, metavar="N",
                   help="sequences decoded together, each with its own cache slot (default 8)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a slot; beyond that new requests get 429 (default 64)")
    s.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                   help="tokens per sequence, prompt + max_tokens; each slot's cache holds this many (default: "
                        "the model's context length, at most 4096)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1/* (default: no key)")
    s.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="end a request that takes longer, queueing included, with an error (default: no limit)")
    s.add_argument("--max-body-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body in MiB, images included; larger ones get 413 (default 20)")
    s.set_defaults(func=run)


def model_id(spec: str | None) -> str:
    """The id a model is served under by default: the GGUF's file name without .gguf, the directory's name,
    the hub id, or gemma-3-270m for the embedded model."""
    from gemmakit import hub

    if hub.is_default(spec):
        return "gemma-3-270m"
    path = Path(spec).expanduser()
    if path.exists():
        return path.name.removesuffix(".gguf") or str(path)
    return spec


def _check(args: argparse.Namespace) -> None:
    from gemmakit import cli

    cli._at_least("--port", args.port, 0)
    if args.port > 65535:
        raise cli.UserError(f"--port must be at most 65535, got {args.port}")
    cli._at_least("--max-concurrent", args.max_concurrent, 1)
    cli._at_least("--max-queue", args.max_queue, 0)
    cli._at_least("--max-model-len", args.max_model_len, 2, " (<bos> + one new token)")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise cli.UserError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if not args.max_body_mb > 0:
        raise cli.UserError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.api_key is not None and not args.api_key.strip():
        raise cli.UserError("--api-key needs a non-empty key")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; OSError naming the address when it is taken or not ours to use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}") from None
    return sock


def load_service(args: argparse.Namespace, service) -> None:
    """Load the model and start the scheduler, then mark the service ready (runs on a thread)."""
    from gemmakit import cli
    from gemmakit.serve.protocol import Served
    from gemmakit.serve.scheduler import Scheduler

    model, tokenizer = cli._load(args)
    scheduler = Scheduler(model, tokenizer, max_slots=args.max_concurrent, max_len=args.max_model_len,
                          max_queue=args.max_queue, compile=cli._compile(args, model))
    scheduler.start()
    name = args.served_model_name or model_id(args.model)
    spec = str(args.model or "default")  # the name as the user gave it serves as well
    aliases = (spec,) if spec != name else ()
    service.ready(scheduler, Served(tokenizer, model.config, name, scheduler.max_len, aliases))


def run(args: argparse.Namespace) -> None:
    """`gemmakit serve`: check the options, listen, load the model on a thread, serve until a signal."""
    import uvicorn

    from gemmakit import hub
    from gemmakit.serve.app import Service, create_app

    _check(args)
    config = hub.load_config(args.model)  # a missing file or unknown name fails now, before binding
    if args.max_model_len is not None and args.max_model_len > config.max_seq_len:
        from gemmakit.cli import UserError

        raise UserError(f"--max-model-len {args.max_model_len} exceeds {config.name}'s context length of "
                        f"{config.max_seq_len} tokens")
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    service = Service(api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2**20),
                      request_timeout=args.request_timeout)
    server = _server(uvicorn.Config(create_app(service), log_level="info", timeout_graceful_shutdown=5), service)

    def load() -> None:
        try:
            load_service(args, service)
        except BaseException as e:  # reported by run() once the server has stopped
            service.failed(e)
            server.should_exit = True
            return
        print(f"gemmakit: serving {service.served.model_id} on http://{host}:{port} (chat page at /, "
              f"API at /v1)", file=sys.stderr, flush=True)

    print(f"gemmakit: listening on http://{host}:{port}; loading the model ...", file=sys.stderr, flush=True)
    threading.Thread(target=load, name="gemmakit-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if service.scheduler is not None:
            service.scheduler.close(drain=False, timeout=5)
        sock.close()
    if service.error is not None:
        raise service.error


def _server(config, service):
    """uvicorn's Server with gemmakit's shutdown: the first SIGTERM or SIGINT drains (new requests get 503,
    submitted ones finish), then the server stops; a second one, or one while loading, stops at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # not uvicorn's: it would re-raise the signal at exit
            name = signal.Signals(sig).name
            if service.status == "draining":  # the second signal: end the running requests now (each client
                print(f"gemmakit: {name} again: cancelling the running requests", file=sys.stderr, flush=True)
                # gets an error event), then uvicorn closes the connections
                threading.Thread(target=service.scheduler.close, kwargs=dict(drain=False), daemon=True).start()
                self.should_exit = True
                return
            if service.status != "ready":  # loading (or failed): nothing runs yet
                self.should_exit = True
                return
            print(f"gemmakit: {name}: finishing the running requests, refusing new ones", file=sys.stderr, flush=True)

            def drain() -> None:
                service.drain()
                self.should_exit = True

            threading.Thread(target=drain, name="gemmakit-drain", daemon=True).start()

    return DrainingServer(config)
