"""The OpenAI-compatible HTTP API over one loaded model, as a Starlette application.

Every request is authenticated (when the server has an API key), bounded in size, parsed and
checked in full (tapml.server.requests) before it is queued for the model's one worker
thread. Answers and errors are shaped as OpenAI's, so that its clients work unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import generate, requests
from .errors import ApiError
from .generate import Finish, Text
from .worker import Ticket, Worker

log = logging.getLogger("tapml")

MAX_BODY_MB = 4


class Server:
    """One model (an Engine or an Embedder) behind the API: `app` is the ASGI application."""

    def __init__(self, runtime: Any, model_id: str, api_key: str | None = None,
                 max_queue: int = 16, max_body_mb: float = MAX_BODY_MB):  # fmt: skip
        self.runtime, self.model_id, self.api_key = runtime, model_id, api_key
        self.embeds = hasattr(runtime, "embed_ids")
        self.max_body = int(max_body_mb * 2**20)
        self.worker = Worker(max_queue)
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                Exception: _server_error},  # fmt: skip
        )

    # routes
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model"])
        return JSONResponse(self._card())

    async def health(self, request: Request) -> Response:
        """Liveness and the queue: what runs, waits, and what was served, cancelled, refused."""
        return JSONResponse({"status": "ok", "model": self.model_id, **self.worker.health()})

    async def chat(self, request: Request) -> Response:
        data = await self._read(request, "a chat model", for_embeddings=False)
        gen = await run_in_threadpool(requests.chat_request, data, self.runtime,
                                      self._constraint)  # fmt: skip
        return await self._generate(request, gen)

    async def completions(self, request: Request) -> Response:
        data = await self._read(request, "a text generation model", for_embeddings=False)
        gen = await run_in_threadpool(requests.completion_request, data, self.runtime)
        return await self._generate(request, gen)

    async def embeddings(self, request: Request) -> Response:
        data = await self._read(request, "an embedding model", for_embeddings=True)
        job = await run_in_threadpool(requests.embedding_request, data, self.runtime)
        ticket = self.worker.submit(generate.embedding(self.runtime, job))
        (vectors,) = await _collect(request, ticket)
        items = [{"object": "embedding", "index": i,
                  "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                  if job.base64 else v.tolist()} for i, v in enumerate(vectors)]  # fmt: skip
        tokens = sum(len(r) for r in job.rows)
        return JSONResponse({"object": "list", "data": items, "model": self.model_id,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # the steps every request takes
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: "
                           "Bearer KEY'", code="missing_api_key")  # fmt: skip
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    async def _read(self, request: Request, needs: str, for_embeddings: bool) -> Any:
        """The request's JSON body, once it is authorized, within the size bound, and for the
        model this server has."""
        self._authorize(request)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body:
            raise _too_large(self.max_body)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body:
                    raise _too_large(self.max_body)
        except ClientDisconnect:
            raise ApiError(400, "the client went before its request was read") from None
        try:
            data = json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
        model = requests.model_of(data)
        if model is None:
            raise ApiError(400, "model: required (this server has "
                           f"{json.dumps(self.model_id)})", param="model",
                           code="missing_required_parameter")  # fmt: skip
        self._check_model(model)
        if self.embeds != for_embeddings:
            kind = "an embedding model" if self.embeds else "a text generation model"
            raise ApiError(400, f"{self.model_id} is {kind}, not {needs}; use "
                           + ("/v1/embeddings" if self.embeds else "/v1/chat/completions or "
                              "/v1/completions"), param="model",
                           code="model_not_supported")  # fmt: skip
        return data

    def _check_model(self, model: Any) -> None:
        if model != self.model_id:
            raise ApiError(404, f"The model {json.dumps(model)} does not exist; this server has "
                           f"{json.dumps(self.model_id)}", param="model",
                           code="model_not_found")  # fmt: skip

    def _constraint(self, kind: str, value: str | None, strict: bool) -> Any:
        from tapml.runtime.grammar import make_constraint

        return make_constraint(kind, value, self.runtime.tokenizer, strict=strict)

    def _card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "tapml"}  # fmt: skip

    async def _generate(self, request: Request, gen: requests.Generation) -> Response:
        ticket = self.worker.submit(generate.generation(self.runtime, gen))
        shape = _Shape(gen, self.model_id)
        if not gen.stream:
            return JSONResponse(shape.whole(await _collect(request, ticket)))
        # the first event before the answer starts: an error before any text keeps its status
        first = await _collect(request, ticket, first=True)
        return StreamingResponse(_sse(shape, first, ticket), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip


class _Shape:
    """OpenAI's answer objects, whole and streamed, for a chat or a (legacy) completion."""

    def __init__(self, gen: requests.Generation, model: str):
        self.gen, self.chat = gen, gen.kind == "chat"
        self.head = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion" if self.chat else "text_completion",
                     "created": int(time.time()), "model": model,
                     "system_fingerprint": None}  # fmt: skip

    def whole(self, events: list[Any]) -> dict[str, Any]:
        texts = [e for e in events if isinstance(e, Text)]
        (finish,) = [e for e in events if isinstance(e, Finish)]
        text = "".join(t.text for t in texts)
        entries = [x for t in texts for x in t.logprobs] + finish.logprobs
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish.reason,
                                  "logprobs": self._logprobs(entries, len(self.gen.echo))}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = self.gen.echo + text
        return {**self.head, "choices": [choice], "usage": finish.usage}

    def chunks(self, event: Any, offset: int) -> list[dict[str, Any]]:
        """The chunks that stream `event` (`offset`: characters streamed so far)."""
        usage = {"usage": None} if self.gen.include_usage else {}
        head = {**self.head, "object": "chat.completion.chunk" if self.chat
                else "text_completion", **usage}  # fmt: skip
        if isinstance(event, Text):
            return [{**head, "choices": [self._choice(event.text, event.logprobs, offset)]}]
        out = [{**head, "choices": [self._choice("", event.logprobs, offset, event.reason)]}]
        if self.gen.include_usage:
            out.append({**head, "choices": [], "usage": event.usage})
        return out

    def _choice(self, text: str, entries: list[dict[str, Any]], offset: int,
                reason: str | None = None) -> dict[str, Any]:  # fmt: skip
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason,
                                  "logprobs": self._logprobs(entries, offset) if entries
                                  else None}  # fmt: skip
        if self.chat:
            choice["delta"] = {"content": text} if reason is None else {}
        else:
            choice["text"] = text
        return choice

    def _logprobs(self, entries: list[dict[str, Any]], offset: int) -> dict[str, Any] | None:
        if self.gen.logprobs is None:
            return None
        if self.chat:
            return {"content": entries, "refusal": None}
        offsets = []
        for e in entries:  # the legacy format: parallel lists, characters into the text
            offsets.append(offset)
            offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in entries], "text_offset": offsets}  # fmt: skip


async def _sse(shape: _Shape, first: list[Any], ticket: Ticket) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the finish, then [DONE]; an error after
    the stream began is an event with OpenAI's error object (its client raises it)."""
    try:
        offset = len(shape.gen.echo)
        if shape.chat:
            role = {**shape.chunks(Text(""), 0)[0]}
            role["choices"] = [{**role["choices"][0], "delta": {"role": "assistant",
                                                                "content": ""}}]  # fmt: skip
            yield _event(role)
        elif shape.gen.echo:
            yield _event(shape.chunks(Text(shape.gen.echo), 0)[0])
        async for event in _chain(first, ticket):
            if isinstance(event, ApiError):
                yield _event(event.body())
                return
            for chunk in shape.chunks(event, offset):
                yield _event(chunk)
            if isinstance(event, Text):
                offset += len(event.text)
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # the client went (or all was sent): the job stops at its next token


async def _chain(first: list[Any], ticket: Ticket) -> AsyncIterator[Any]:
    for event in first:
        yield event
    async for event in ticket:
        yield event


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _collect(request: Request, ticket: Ticket, first: bool = False) -> list[Any]:
    """The job's events (only the first if `first`); an ApiError event is raised. A client
    that goes while it waits cancels the job."""
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, ticket))
    events = []
    try:
        async for event in ticket:
            if isinstance(event, ApiError):
                raise event
            events.append(event)
            if first:
                break
    finally:
        watcher.cancel()
    if not events or watcher.done() and not watcher.cancelled():
        raise ApiError(400, "the client went before the answer", code="client_gone")
    return events


async def _cancel_on_disconnect(request: Request, ticket: Ticket) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    ticket.cancel()


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit // 2**20} MiB "
                    "(tapml serve --max-body-mb)", code="request_too_large")  # fmt: skip


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    if e.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, e.message)
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}  # fmt: skip
    return await _api_error(request, ApiError(e.status_code, message.get(e.status_code,
                                                                         str(e.detail))))


async def _server_error(request: Request, e: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(ApiError(500, f"the server failed: {e}", code="server_error").body(),
                        status_code=500)  # fmt: skip
