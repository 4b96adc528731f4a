"""The OpenAI-compatible HTTP API over the scheduler: Starlette routes, SSE streaming, errors, metrics.

The app only checks requests (protocol.py), submits them to the scheduler and relays its events: it
knows nothing of batching, and the scheduler knows nothing of HTTP. Events arrive on the scheduler's
thread and are handed to the request's coroutine through the event loop (call_soon_threadsafe).

Faults stay with their request: a bad request is a 4xx OpenAI error before anything is queued; a
client that disconnects, or a request that runs past the timeout, is cancelled in the scheduler (its
slot is free by the next step); an error inside the scheduler ends that request alone. Nothing a
client sends produces a traceback in a reply: an unexpected exception is a plain 500 error object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from gemmakit.serve.metrics import Metrics
from gemmakit.serve.protocol import (APIError, Job, Served, TokenText, completion_logprobs, parse_chat,
                                     parse_completion, usage)
from gemmakit.serve.scheduler import QueueFull

DEFAULT_MAX_BODY = 20 * 2**20  # bytes; a few base64 images fit, a 50 MB upload does not


class Service:
    """The state the routes share: the model once loaded, the scheduler, limits, counters.

    `status` is "loading" (503 to API calls) until `ready()`, "draining" after `drain()` (503 to new
    requests while the running ones finish), or "failed" when loading failed.
    """

    def __init__(self, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
                 request_timeout: float | None = None) -> None:
        self.api_key, self.max_body_bytes, self.request_timeout = api_key, max_body_bytes, request_timeout
        self.status = "loading"
        self.served: Served | None = None
        self.scheduler = None
        self.error: BaseException | None = None
        self.metrics = Metrics()
        self.created = int(time.time())
        self._active = 0  # requests submitted and not yet answered (draining waits for 0)
        self._lock = threading.Condition()

    def ready(self, scheduler, served: Served) -> None:
        self.scheduler, self.served = scheduler, served
        self.status = "ready"

    def failed(self, error: BaseException) -> None:
        self.error, self.status = error, "failed"

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests (503) and wait until the submitted ones are answered; True if they all were."""
        with self._lock:
            self.status = "draining" if self.status == "ready" else self.status
            return self._lock.wait_for(lambda: self._active == 0, timeout)

    def _enter(self) -> None:
        """Count a request in, unless the server has stopped taking them (checked under the same lock the
        drain waits on, so that no request slips in after the drain saw none running)."""
        with self._lock:
            if self.status != "ready":
                raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down")
            self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            self._lock.notify_all()


def _error(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Ticket:
    """One submitted request: its events as they come, its timing metrics, its cancellation."""

    def __init__(self, service: Service, job: Job, endpoint: str) -> None:
        self.service, self.job, self.endpoint = service, job, endpoint
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.start = time.perf_counter()
        self.outcome: str | None = None  # the finish reason, or why it ended without one
        self.closed = False
        service._enter()
        try:
            self.id = service.scheduler.submit(job.request, self._on_event)  # may raise ValueError, QueueFull
        except BaseException:
            service._leave()
            raise

    def _on_event(self, event) -> None:  # the scheduler's thread
        stamp = time.perf_counter()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (stamp, event))
        except RuntimeError:  # the event loop has closed: nobody is waiting for this request any more
            pass

    async def events(self) -> AsyncIterator[Any]:
        """The scheduler's events up to the last one; APIError(504) past the request timeout."""
        timeout = self.service.request_timeout
        deadline = None if timeout is None else self.start + timeout
        last = None
        while True:
            try:
                wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
                stamp, event = await asyncio.wait_for(self.queue.get(), wait)
            except (asyncio.TimeoutError, TimeoutError):
                self.outcome = "timeout"
                self.close()
                raise APIError(504, f"the request took longer than the server's request timeout of {timeout:g} s "
                                    "(--request-timeout) and was cancelled", code="timeout") from None
            if event.token is not None:
                metrics = self.service.metrics
                metrics.first_token(stamp - self.start) if last is None else metrics.next_token(stamp - last)
                last = stamp
            if event.finish_reason is not None:
                self.outcome = event.finish_reason
                self.service.metrics.tokens(event.prompt_tokens, event.completion_tokens)
            yield event
            if event.finish_reason is not None:
                return

    def close(self) -> None:
        """Idempotent end: cancel the request in the scheduler unless it finished, count it as answered."""
        if self.closed:
            return
        self.closed = True
        if self.outcome is None or self.outcome == "timeout":
            self.service.scheduler.cancel(self.id)
        self.service.metrics.request(self.endpoint, self.outcome or "disconnected")
        self.service._leave()


class _EventStream(StreamingResponse):
    """A streaming response that always closes its ticket, even when the client leaves before the
    first byte (then the body generator never starts and its own `finally` would not run)."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.close()


async def _disconnected(receive: Callable) -> None:
    """Return when the client closes the connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class API:
    """The routes of one Service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    # -- checks before a request is queued --

    def _check_auth(self, request: HTTPRequest) -> None:
        key = self.service.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                           code="invalid_api_key")

    def _check_ready(self) -> None:
        status = self.service.status
        if status == "loading":
            raise APIError(503, "the model is loading; retry when GET /health answers 200", code="loading")
        if status != "ready":
            raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down")

    async def _body(self, request: HTTPRequest) -> dict:
        limit = self.service.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than the server's limit of {limit:,} bytes "
                                "(--max-body-mb)", code="request_too_large")
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def _submit(self, request: HTTPRequest, endpoint: str, parse: Callable[[dict, Served], Job]) -> Response:
        try:
            self._check_auth(request)
            self._check_ready()
            body = await self._body(request)
            job = await run_in_threadpool(parse, body, self.service.served)  # tokenizing, decoding images
            try:
                ticket = Ticket(self.service, job, endpoint)
            except QueueFull:
                raise APIError(429, "the server's queue is full; retry later", code="queue_full") from None
            except RuntimeError:  # the scheduler is closing
                raise APIError(503, "the server is shutting down and takes no new requests",
                               code="shutting_down") from None
            except ValueError as e:  # the scheduler's own checks (a prompt too long for its slots, ...)
                raise APIError(400, str(e)) from None
        except APIError as e:
            self.service.metrics.request(endpoint, str(e.status))
            return _error(e)
        if job.stream:
            writer = self._chat_stream if endpoint == "chat" else self._completion_stream
            return _EventStream(writer(ticket), ticket)
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        answer = asyncio.ensure_future(self._answer(ticket, endpoint))
        try:
            await asyncio.wait({watcher, answer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not answer.done():  # the client left: nobody reads the answer
                answer.cancel()
            ticket.close()
        if answer.cancelled():
            return Response(status_code=499)  # nginx's "client closed request"; never delivered
        return answer.result()

    # -- answers --

    def _head(self, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.service.served.model_id, "system_fingerprint": None}

    async def _answer(self, ticket: Ticket, endpoint: str) -> Response:
        job, tokens = ticket.job, TokenText(self.service.served.tokenizer, ticket.job.token_ids)
        text, entries, last = [], [], None
        try:
            async for event in ticket.events():
                text.append(event.text)
                if job.logprobs and event.token is not None:
                    entries.append(tokens.chat_entry(event.token, event.logprob, event.top_logprobs))
                last = event
            _check_finish(last)
        except APIError as e:
            return _error(e)
        counts = usage(last.prompt_tokens, last.completion_tokens)
        if endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "logprobs": {"content": entries} if job.logprobs else None, "finish_reason": last.finish_reason}
            return JSONResponse({**self._head("chatcmpl"), "object": "chat.completion", "choices": [choice],
                                 "usage": counts})
        choice = {"index": 0, "text": "".join(text), "logprobs": completion_logprobs(entries) if job.logprobs else None,
                  "finish_reason": last.finish_reason}
        return JSONResponse({**self._head("cmpl"), "object": "text_completion", "choices": [choice], "usage": counts})

    async def _chat_stream(self, ticket: Ticket) -> AsyncIterator[str]:
        job, tokens = ticket.job, TokenText(self.service.served.tokenizer, ticket.job.token_ids)
        head = {**self._head("chatcmpl"), "object": "chat.completion.chunk"}
        extra = {"usage": None} if job.include_usage else {}

        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish}], **extra})

        yield chunk({"role": "assistant", "content": ""})
        async for out in self._relay(ticket, tokens):
            if isinstance(out, str):
                yield out
                continue
            event, entry = out
            if event.text or entry:
                yield chunk({"content": event.text}, logprobs={"content": [entry]} if entry else None)
            if event.finish_reason is not None:
                yield chunk({}, event.finish_reason)
                if job.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(event.prompt_tokens, event.completion_tokens)})
        yield "data: [DONE]\n\n"

    async def _completion_stream(self, ticket: Ticket) -> AsyncIterator[str]:
        job, tokens = ticket.job, TokenText(self.service.served.tokenizer, ticket.job.token_ids)
        head = {**self._head("cmpl"), "object": "text_completion"}
        extra = {"usage": None} if job.include_usage else {}
        offset = 0
        async for out in self._relay(ticket, tokens):
            if isinstance(out, str):
                yield out
                continue
            event, entry = out
            if event.text or entry or event.finish_reason is not None:
                logprobs = completion_logprobs([entry], offset) if entry else None
                yield _sse({**head, "choices": [{"index": 0, "text": event.text, "logprobs": logprobs,
                                                 "finish_reason": event.finish_reason}], **extra})
                offset += len(event.text)
            if event.finish_reason is not None and job.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(event.prompt_tokens, event.completion_tokens)})
        yield "data: [DONE]\n\n"

    async def _relay(self, ticket: Ticket, tokens: TokenText) -> AsyncIterator[Any]:
        """(event, logprobs entry or None) per event; an error ends the stream as an SSE error object."""
        try:
            async for event in ticket.events():
                if event.finish_reason in ("error", "cancelled"):
                    _check_finish(event)
                entry = None
                if ticket.job.logprobs and event.token is not None:
                    entry = tokens.chat_entry(event.token, event.logprob, event.top_logprobs)
                yield event, entry
        except APIError as e:
            yield _sse(e.body())

    # -- routes --

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._submit(request, "chat", parse_chat)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._submit(request, "completions", parse_completion)

    async def models(self, request: HTTPRequest) -> Response:
        try:
            self._check_auth(request)
            self._check_ready()
        except APIError as e:
            return _error(e)
        served = self.service.served
        card = {"id": served.model_id, "object": "model", "created": self.service.created, "owned_by": "gemmakit",
                "max_model_len": served.context}
        wanted = request.path_params.get("model")
        if wanted is None:
            return JSONResponse({"object": "list", "data": [card]})
        if wanted != served.model_id and wanted not in served.aliases:
            return _error(APIError(404, f"The model `{wanted}` does not exist", "model", "model_not_found"))
        return JSONResponse(card)

    async def health(self, request: HTTPRequest) -> Response:
        status = self.service.status
        return JSONResponse({"status": "ok" if status == "ready" else status},
                            status_code=200 if status == "ready" else 503)

    async def metrics(self, request: HTTPRequest) -> Response:
        stats = self.service.scheduler.stats() if self.service.scheduler is not None else {}
        gauges = {"gemmakit_num_requests_running": ("Sequences in the running batch", stats.get("running", 0)),
                  "gemmakit_num_requests_waiting": ("Requests queued for a slot", stats.get("queued", 0)),
                  "gemmakit_num_slots": ("Sequences the scheduler runs at once (--max-concurrent)",
                                         stats.get("slots", 0)),
                  "gemmakit_model_loaded": ("1 once the model is loaded and the server answers",
                                            int(self.service.status == "ready"))}
        return PlainTextResponse(self.service.metrics.render(gauges),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(self, request: HTTPRequest) -> Response:
        return HTMLResponse(resources.files("gemmakit.serve").joinpath("static", "index.html")
                            .read_text(encoding="utf-8"))


def _check_finish(event) -> None:
    """An event that ended a request without an answer, as the APIError the client gets."""
    if event is None or event.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled: the server is shutting down", code="cancelled")
    if event.finish_reason == "error":
        raise APIError(500, f"the request failed: {event.error}", code="generation_error")


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(APIError(exc.status_code, message.get(exc.status_code, exc.detail)))


async def _unexpected(request: HTTPRequest, exc: Exception) -> Response:
    return _error(APIError(500, f"internal error ({type(exc).__name__}); the server goes on serving"))


def create_app(service: Service) -> Starlette:
    """The ASGI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics and the chat page."""
    api = API(service)
    routes = [Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model:path}", api.models, methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/metrics", api.metrics, methods=["GET"]),
              Route("/", api.page, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _unexpected})
