"""The two standard text-generation surfaces, as views the shared route table calls.

* The Open Inference Protocol's generate extension: ``POST /v2/models/{m}[/versions/{v}]/
  generate`` (one JSON answer) and ``/generate_stream`` (server-sent events, one per token
  delta, the last with ``"done": true`` and ``details``).
* The OpenAI-compatible API the official ``openai`` client expects: ``GET /v1/models``,
  ``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed (``data: {...}`` chunks
  then ``data: [DONE]``) or not, with ``usage`` and ``finish_reason``.

Each view returns ``(status, headers, body)`` where ``body`` is bytes or an iterator of bytes
(a stream); the route table wraps it. Errors are raised as :mod:`runtime.errors` before the
first byte, so they keep their status; a failure mid-stream becomes a final error event.
Closing a stream (a client that went away) cancels its sequence within one decode step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from runtime import current_call
from runtime.errors import BadRequest, NotFound, ShardserveError
from runtime.jsonio import json_dumps, json_loads

SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty"}
OIP_FIELDS = {"text_input", "parameters", "id"}
OPENAI_COMMON = SAMPLING | {"model", "stream", "stream_options", "n", "user",
                            "max_completion_tokens", "presence_penalty", "frequency_penalty"}
COMPLETION_FIELDS = OPENAI_COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = OPENAI_COMMON | {"messages", "logprobs", "top_logprobs"}
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
JSON_HEADERS = {"Content-Type": "application/json"}
OPENAI_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def _body(req: Any) -> dict:
    if not req.body:
        raise BadRequest("the request body must be a JSON object")
    try:
        body = json_loads(req.body)
    except Exception:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _sse(obj: Any) -> bytes:
    return b"data: " + json_dumps(obj) + b"\n\n"


def _backend(rt, model: str, version: str | None = None):
    backend = rt.get_model(model, version).backend
    if not hasattr(backend, "generate"):
        raise BadRequest(f"model {model!r} does not generate text")
    return backend


def _guarded(events: Iterator, render, on_error) -> Iterator[bytes]:
    """Render events as SSE bytes; an error mid-stream ends it with one error event, and
    closing this iterator closes the generation (frees its batch slot)."""
    try:
        for event in events:
            yield from render(event)
    except ShardserveError as exc:
        yield on_error(exc.message)
    except Exception:  # a bug: say so without detail, as error_response does
        yield on_error("internal server error")
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


# Open Inference Protocol -------------------------------------------------------------------


def oip_generate(rt, req, model: str, version: str | None = None, stream: bool = False):
    backend = _backend(rt, model, version)
    body = _body(req)
    unknown = set(body) - OIP_FIELDS
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be a JSON object")
    if "text_input" not in body:
        raise BadRequest("'text_input' is required")
    request = backend.parse(params, body["text_input"], SAMPLING)
    events = rt.generate(model, request, version=version, principal=req.principal,
                         deadline=req.deadline)
    head = {"model_name": model, "model_version": str(rt.get_model(model, version).version)}
    if isinstance(body.get("id"), str):
        head["id"] = body["id"]
    if not stream:
        parts, details = [], {}
        for event in events:
            if "finish_reason" in event:
                details = event
            else:
                parts.append(event["text"])
        return 200, dict(JSON_HEADERS), json_dumps({**head, "text_output": "".join(parts),
                                                    "details": details})

    def render(event: dict):
        if "finish_reason" in event:
            yield _sse({**head, "text_output": "", "done": True, "details": event})
        elif event["text"]:
            yield _sse({**head, "text_output": event["text"], "done": False})

    return 200, dict(SSE_HEADERS), _guarded(events, render, lambda m: _sse({"error": m}))


# OpenAI-compatible ---------------------------------------------------------------------------


def openai_models(rt, req):
    data = []
    for entry in rt.models():
        if entry.get("state") != "READY":
            continue
        try:
            backend = rt.get_model(entry["name"]).backend
        except ShardserveError:
            continue
        if getattr(backend, "task", None) == "text-generation" and entry["name"] not in [
                d["id"] for d in data]:
            data.append({"id": entry["name"], "object": "model", "created": 0,
                         "owned_by": "shardserve"})
    return 200, dict(JSON_HEADERS), json_dumps({"object": "list", "data": data})


def openai_model(rt, req, model: str):
    backend = rt.get_model(model).backend
    if getattr(backend, "task", None) != "text-generation":
        raise NotFound(f"model {model!r} does not generate text")
    return 200, dict(JSON_HEADERS), json_dumps({"id": model, "object": "model", "created": 0,
                                                "owned_by": "shardserve"})


def _openai_request(rt, req, chat: bool):
    body = _body(req)
    unknown = set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if unknown:
        raise BadRequest(f"unknown or unsupported fields: {', '.join(sorted(unknown))}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required")
    rt.authorize(req.principal, "generate", model)
    call = current_call()
    if call is not None and call.model is None:  # the audit event names the model
        call.model = model
    backend = _backend(rt, model)
    for key, ok in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)),
                    ("logprobs", (None, False)), ("suffix", (None,)),
                    ("top_logprobs", (None, 0))):
        if key in body and body[key] not in ok:
            raise BadRequest(f"'{key}' = {body[key]!r} is not supported")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise BadRequest(f"'{key}' is not supported: use repetition_penalty")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest("'stream_options' takes only include_usage")
    if chat:
        prompt = backend.codec.render_chat(_messages(body.get("messages")))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string (or a list of one string)")
    params = {k: body[k] for k in SAMPLING | {"max_completion_tokens"} if k in body}
    request = backend.parse(params, prompt, SAMPLING | {"max_completion_tokens"})
    return model, request, stream, bool(options.get("include_usage"))


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list")
    out = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message needs a 'role' and a 'content'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise BadRequest("only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest("each message needs a 'role' and a 'content'")
        out.append({"role": message["role"], "content": content})
    return out


def openai_completions(rt, req, chat: bool = False):
    model, request, stream, include_usage = _openai_request(rt, req, chat)
    events = rt.generate(model, request, principal=req.principal, deadline=req.deadline)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def usage(end: dict) -> dict:
        return {"prompt_tokens": end.get("prompt_tokens", 0),
                "completion_tokens": end.get("completion_tokens", 0),
                "total_tokens": end.get("prompt_tokens", 0) + end.get("completion_tokens", 0)}

    def reason(end: dict) -> str:
        return OPENAI_REASONS.get(end.get("finish_reason"), end.get("finish_reason"))

    if not stream:
        parts, end = [], {}
        for event in events:
            if "finish_reason" in event:
                end = event
            else:
                parts.append(event["text"])
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": None, "finish_reason": reason(end)} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason(end)})
        return 200, dict(JSON_HEADERS), json_dumps({
            "id": ident, "object": kind, "created": created, "model": model,
            "choices": [choice], "usage": usage(end)})

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": ident, "object": chunk_kind, "created": created, "model": model}
    started = [False]

    def choice(text: str | None, finish: str | None) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict = {}
        if not started[0]:
            delta["role"] = "assistant"
            started[0] = True
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def render(event: dict):
        if "finish_reason" in event:
            yield _sse({**head, "choices": [choice(None if chat else "", reason(event))]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage(event)})
            yield b"data: [DONE]\n\n"
        elif event["text"]:
            yield _sse({**head, "choices": [choice(event["text"], None)]})

    def on_error(message: str) -> bytes:
        return _sse({"error": openai_error_body(message, 500)["error"]})

    return 200, dict(SSE_HEADERS), _guarded(events, render, on_error)


def openai_error_body(message: str, status: int) -> dict:
    """OpenAI's error shape, which the openai client reads (``error.message``, ``type``)."""
    kind = {400: "invalid_request_error", 401: "authentication_error",
            403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
