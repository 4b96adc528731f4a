"""The OpenAI request and response shapes: JSON bodies checked and turned into scheduler Requests, and
Events turned back into OpenAI objects. No HTTP here (app.py) and no batching (scheduler.py).

Requests are checked field by field before anything is queued: a wrong type, a value out of range, a
value gemmakit cannot honour (`n` > 1, `logit_bias`, `tools`, ...), an unknown model or a prompt that
does not fit the context is an `APIError` naming the field, which the app returns as OpenAI's error
object with the right status. Unknown fields, and known ones at their default values, are accepted.
Message text is plain text: only the turn template places control tokens (tokenizer.chat_segments).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from gemmakit.serve.scheduler import Request

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; each is searched for after every token)
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)


class APIError(Exception):
    """An error returned to the client as OpenAI's {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "service_unavailable_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Served:
    """What the request checks need to know about the model being served."""

    tokenizer: Any  # gemmakit.tokenizer.Tokenizer
    config: Any  # gemmakit.config.Config
    model_id: str  # the id /v1/models lists
    context: int  # prompt + max_tokens must fit in this many tokens
    aliases: tuple[str, ...] = ()  # other names a request's "model" may use (the --model SPEC as given)

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return  # clients that send no model get the one there is
        if not isinstance(model, str):
            raise APIError(400, f"model must be a string, got {_kind(model)}", "model")
        if model != self.model_id and model not in self.aliases:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_id}`",
                           "model", "model_not_found")


@dataclass
class Job:
    """A checked request: what to submit, and how to answer."""

    request: Request
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool = False  # report each token's logprob (and request.logprobs alternatives)
    token_ids: bool = False  # return_tokens_as_token_ids (vLLM's): logprob tokens as "token_id:N"
    images: int = 0
    fields: dict = field(default_factory=dict)


# -- field checks ----------------------------------------------------------------------------------------------

def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 16.0 is what some JSON encoders write for 16
    if not isinstance(v, int) or isinstance(v, bool):
        raise APIError(400, f"{name} must be an integer, got {_kind(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(400, f"{name} must be {bound}, got {v}", name)
    return v


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise APIError(400, f"{name} must be a finite number, got {_kind(v) if not isinstance(v, float) else v}", name)
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"{name} must be a boolean, got {_kind(v)}", name)
    return v


def _refuse_unsupported(body: dict, defaults: dict) -> None:
    """Fields gemmakit cannot honour: accepted at their default (or empty) value, else a 400 naming them."""
    for name, (ok, why) in defaults.items():
        v = body.get(name)
        if v is not None and v not in ok:
            raise APIError(400, f"{name}={v!r} is not supported: {why}", name)


_UNSUPPORTED = {
    "n": ((1,), "gemmakit returns one choice per request; send n requests"),
    "best_of": ((1,), "gemmakit returns one choice per request"),
    "logit_bias": (({},), "gemmakit does not bias logits"),
    "presence_penalty": ((0, 0.0), "gemmakit has no presence penalty"),
    "frequency_penalty": ((0, 0.0), "gemmakit has no frequency penalty"),
    "repetition_penalty": ((1, 1.0), "the server has no repetition penalty (gemmakit generate has one)"),
    "tools": (([],), "gemmakit does not call tools"),
    "functions": (([],), "gemmakit does not call functions"),
    "tool_choice": (("none", "auto"), "gemmakit does not call tools"),
    "function_call": (("none", "auto"), "gemmakit does not call functions"),
    "response_format": (({"type": "text"},), "gemmakit writes plain text only (no JSON mode or schemas)"),
    "audio": ((), "Gemma produces no audio"),
    "modalities": ((["text"],), "Gemma produces text only"),
    "echo": ((False,), "gemmakit does not echo the prompt"),
    "suffix": (("",), "Gemma has no fill-in-the-middle"),
}


def _sampling(body: dict) -> dict:
    """Request keywords for the sampling fields (OpenAI's defaults: temperature 1, top_p 1)."""
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise APIError(400, f"temperature must be >= 0, got {temperature:g}", "temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p:g}", "top_p")
    min_p = _number(body, "min_p")
    if min_p is not None and not 0 <= min_p <= 1:
        raise APIError(400, f"min_p must be in [0, 1], got {min_p:g}", "min_p")
    top_k = _int(body, "top_k", -1)  # -1 and 0 are "off", as vLLM and llama.cpp spell it
    seed = _int(body, "seed", -2**63, 2**64 - 1)  # the range a torch.Generator seed may take
    return dict(temperature=1.0 if temperature is None else temperature,
                top_k=top_k if top_k and top_k > 0 else None,
                top_p=top_p if top_p is not None and top_p < 1 else None,
                min_p=min_p or None, seed=seed, stop=_stop(body))


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or an array of strings", "stop")
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    return tuple(stop)


def _stop_ids(body: dict) -> tuple[int, ...] | None:
    """ignore_eos (vLLM's and llama.cpp's extension): generate max_tokens whatever comes, for benchmarks."""
    return () if _bool(body, "ignore_eos") else None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise APIError(400, f"stream_options must be an object, got {_kind(options)}", "stream_options")
    return stream, stream and _bool(options, "include_usage")


def _max_tokens(body: dict, names: tuple[str, ...]) -> int | None:
    given = [v for name in names if (v := _int(body, name, 1)) is not None]
    return given[0] if given else None


def _fit(served: Served, prompt_len: int, max_tokens: int | None, default: int | None, param: str) -> int:
    """max_tokens, or the default (None: the rest of the context); 400 if the prompt and it do not fit."""
    room = served.context - prompt_len
    if max_tokens is None:
        max_tokens = room if default is None else min(default, room)
    if room < 1 or prompt_len + max_tokens > served.context:
        raise APIError(400, f"This model's maximum context length is {served.context} tokens, however you requested "
                            f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in your prompt; "
                            f"{max(max_tokens, 1)} for the completion). Please reduce the length of the "
                            f"{'messages' if param == 'messages' else 'prompt'} or completion.",
                       param, "context_length_exceeded")
    return max_tokens


# -- /v1/chat/completions -------------------------------------------------------------------------------------

_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*;base64,(.*)", re.S)


def _image_bytes(url: Any, where: str) -> bytes:
    if not isinstance(url, str):
        raise APIError(400, f"{where}: image_url.url must be a string", "messages")
    m = _DATA_URL.fullmatch(url)
    if m is None:
        what = "a remote URL" if url.startswith(("http://", "https://")) else "not a data: URL"
        raise APIError(400, f"{where}: {what}: the server fetches nothing from the network; send the image "
                            "inline as data:image/png;base64,... (PNG or JPEG)", "messages")
    try:
        return base64.b64decode(re.sub(r"\s+", "", m.group(3)), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the image's data: URL is not valid base64", "messages") from None


def decode_image(data: bytes, size: int, where: str) -> Any:
    """PNG/JPEG bytes -> pixels [1, 3, size, size] (gemmakit.image's preprocessing); a 400 naming
    `where` for data that is not an image, truncated, or over Pillow's decompression-bomb limit."""
    from gemmakit import image

    try:
        import PIL.Image as Image
    except ImportError:
        raise APIError(400, "this server cannot read images: it needs Pillow (pip install 'gemmakit[vision]')",
                       "messages") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse what Pillow only warns about
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return image.preprocess(img, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(400, f"{where}: image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels)", "messages") from None
    except Image.UnidentifiedImageError:
        raise APIError(400, f"{where}: the data is not an image Pillow can read (send PNG or JPEG)",
                       "messages") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise APIError(400, f"{where}: truncated or corrupt image ({e})", "messages") from None


def _content(content: Any, where: str, images: list[bytes]) -> Any:
    """OpenAI content (a string or parts) as gemmakit's (text and {"type": "image"} parts), image bytes kept."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or an array of parts, got {_kind(content)}",
                       "messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}, part {j}: a text part needs a string text", "messages")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(_image_bytes(url.get("url") if isinstance(url, dict) else url, f"{where}, part {j}"))
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"{where}, part {j}: content part type {kind!r} is not supported (text, image_url)",
                           "messages")
    return parts


def _messages(body: dict) -> tuple[list[dict], list[bytes]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array of {role, content} objects", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object, got {_kind(m)}", "messages")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))  # OpenAI's newer name for system
        if role not in ("system", "user", "assistant", "model"):
            raise APIError(400, f"messages[{i}]: role {m.get('role')!r} is not supported (system, user, assistant)",
                           "messages")
        if m.get("tool_calls") or m.get("function_call"):
            raise APIError(400, f"messages[{i}]: tool calls are not supported", "messages")
        content = _content(m.get("content"), f"messages[{i}]", images)
        if content is None:
            raise APIError(400, f"messages[{i}]: content is missing", "messages")
        out.append({"role": role, "content": content})
    return out, images


def parse_chat(body: dict, served: Served) -> Job:
    """A /v1/chat/completions body -> Job (prompt: Google's turn template for the model's generation).

    Raises APIError (400 with the field named; 404 for an unknown model). Decodes images: call it off
    the event loop.
    """
    from gemmakit import vision

    served.check_model(body)
    _refuse_unsupported(body, _UNSUPPORTED)
    sampling = _sampling(body)
    stream, include_usage = _stream(body)
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    messages, blobs = _messages(body)
    config = served.config
    if blobs and config.vision is None:
        raise APIError(400, f"{config.name} has no vision tower: it is a text-only model and cannot take images",
                       "messages")
    try:
        ids = vision.chat_prompt_ids(served.tokenizer, config, messages, [0] * len(blobs))
    except ValueError as e:  # the template's refusals: roles out of order, a system role on Gemma 1/2, ...
        raise APIError(400, str(e), "messages") from None
    pixels = None
    if blobs:
        import torch

        size = config.vision.image_size
        pixels = torch.cat([decode_image(b, size, f"image {k}") for k, b in enumerate(blobs)])
    request = Request(ids, _fit(served, len(ids), max_tokens, None, "messages"), stop_ids=_stop_ids(body),
                      logprobs=(top or 0) if logprobs else None, images=pixels, **sampling)
    return Job(request, stream, include_usage, logprobs, _bool(body, "return_tokens_as_token_ids"), len(blobs))


# -- /v1/completions ------------------------------------------------------------------------------------------

def _prompt_ids(body: dict, served: Served) -> list[int]:
    """The prompt as ids: text tokenized as `gemmakit generate` does (a raw prompt: <bos> added, control-token
    text parsed, since the caller writes its own template), or token ids taken as they are."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        try:
            return served.tokenizer.encode(prompt)
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", "prompt") from None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = served.config.vocab_size
        if bad := [t for t in prompt if not 0 <= t < vocab]:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary of {vocab}", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, f"prompt: {len(prompt)} prompts in one request are not supported; send one per request "
                            "(the server batches concurrent requests)", "prompt")
    raise APIError(400, "prompt must be a string, an array of token ids, or an array holding one of these", "prompt")


def parse_completion(body: dict, served: Served) -> Job:
    """A /v1/completions body -> Job. Raises APIError (400 naming the field, 404 for an unknown model)."""
    served.check_model(body)
    _refuse_unsupported(body, _UNSUPPORTED)
    sampling = _sampling(body)
    stream, include_usage = _stream(body)
    logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    max_tokens = _max_tokens(body, ("max_tokens",))
    ids = _prompt_ids(body, served)
    request = Request(ids, _fit(served, len(ids), max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt"),
                      stop_ids=_stop_ids(body), logprobs=logprobs, **sampling)
    return Job(request, stream, include_usage, logprobs is not None, _bool(body, "return_tokens_as_token_ids"))


# -- responses ------------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """The text and UTF-8 bytes of single tokens, as logprobs report them (byte pieces as their byte)."""

    _BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.pieces[token] if 0 <= token < len(self.tokenizer.pieces) else ""
        if m := self._BYTE.fullmatch(piece):
            raw = bytes([int(m.group(1), 16)])
            text = raw.decode("utf-8", errors="replace")
        else:
            text = piece.replace("\u2581", " ")
            raw = text.encode("utf-8")
        return (f"token_id:{token}" if self.as_ids else text), list(raw)

    def chat_entry(self, token: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
        """One entry of a chat choice's logprobs.content."""
        text, raw = self(token)
        entry = {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": []}
        for t, lp in top or ():
            t_text, t_raw = self(t)
            entry["top_logprobs"].append({"token": t_text, "logprob": lp, "bytes": t_raw})
        return entry


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """Legacy /v1/completions logprobs {tokens, token_logprobs, top_logprobs, text_offset} from chat entries."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(bytes(e["bytes"]).decode("utf-8", errors="replace"))
    return out
