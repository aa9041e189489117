"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions (server-sent events
when ``stream``), /v1/models, /health and /metrics (Prometheus' text format).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for
the client's mistakes. Besides OpenAI's fields every completion carries ``speculative``: the target
forwards, the acceptance length and the draft version it was decoded with; ``return_token_ids``
(vLLM's name) adds the prompt's and the completion's token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from torchspec_ext.serve.engine import GenerationRequest, GenerationStats
from torchspec_ext.serve.scheduler import Draining, QueueFull, Scheduler
from torchspec_ext.serve.text import TextStream

MAX_STOP = 4  # OpenAI's limit on stop strings


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    return_token_ids: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def check_supported(body: Sampling) -> None:
    """A 400 for what this server does not do, rather than silently ignoring it."""
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if body.top_p not in (None, 1.0):
        raise APIError(400, "only top_p=1 is supported (sampling is from the whole distribution)", param="top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported", param=name)
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if isinstance(body, ChatRequest) and body.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if isinstance(body, CompletionRequest):
        if body.echo or body.suffix is not None or body.best_of not in (None, 1):
            raise APIError(400, "echo, suffix and best_of are not supported")


def stop_list(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "a stop sequence must not be empty", param="stop")
    return stops


def message_text(m: Message) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)", param="messages")
        parts.append(part.text)
    return "".join(parts)


class ServerState:
    def __init__(self, engine, scheduler: Scheduler, api_key: str | None, max_tokens_cap: int | None, learner=None):
        self.engine, self.scheduler, self.api_key, self.learner = engine, scheduler, api_key, learner
        self.max_tokens_cap = max_tokens_cap
        self.created = int(time.time())


def chat_prompt(tokenizer, messages: list[Message]) -> list[int]:
    chat = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)} for m in messages]
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template's own checks (roles out of order ...)
        raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def completion_prompt(tokenizer, prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer(prompt).input_ids
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
        if any(not 0 <= t < vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    else:
        raise APIError(400, "only one prompt per request (a string or a list of token ids)", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


def check_prompt(engine, prompt: list[int]) -> None:
    if len(prompt) < 2 and engine.feature_layers:  # the draft's first proposal needs a token of context
        raise APIError(400, "this server's draft needs a prompt of at least 2 tokens", param="prompt")


def budget(state: ServerState, prompt: list[int], asked: int | None) -> int:
    """max_tokens as the API defines it: what was asked, else what the context leaves; a 400 when
    the prompt and max_tokens do not fit in the context."""
    context = state.engine.context_length
    if len(prompt) >= context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, your prompt is {len(prompt)} tokens "
            "long, which leaves no room to generate.",
            param="messages",
            code="context_length_exceeded",
        )
    if asked is not None and len(prompt) + asked > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {len(prompt) + asked} "
            f"tokens ({len(prompt)} in the prompt, {asked} in the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    left = context - len(prompt) if asked is None else asked
    return min(left, state.max_tokens_cap) if state.max_tokens_cap and asked is None else left


def speculative_info(stats: GenerationStats) -> dict:
    return {
        "target_forwards": stats.target_forwards,
        "acceptance_length": round(stats.acceptance_length, 4),
        "draft_version": stats.draft_version,
        "decode_seconds": round(stats.seconds, 4),
    }


class Generation:
    """One request through the scheduler: text pieces as they come (an async iterator), then the stats."""

    def __init__(self, state: ServerState, prompt: list[int], body: Sampling, max_tokens: int):
        self.stream = TextStream(state.engine.tokenizer, stop_list(body.stop), state.engine.stop_token_ids)
        temperature = 1.0 if body.temperature is None else body.temperature
        request = GenerationRequest(prompt, max_tokens, temperature, body.seed)
        self.prompt, self.max_tokens = prompt, max_tokens
        self.completion_tokens = 0
        self.ended_by_length = False
        self.stats: GenerationStats | None = None
        try:
            self.job = state.scheduler.submit(request, self._on_tokens, asyncio.get_running_loop())
        except QueueFull:
            raise APIError(429, "the server's queue is full; retry later", "server_overloaded") from None
        except Draining:
            raise APIError(503, "the server is shutting down", "server_shutting_down") from None

    def _on_tokens(self, tokens: list[int]) -> bool:  # the worker thread
        for token in tokens:
            if self.stream.finished:
                return True
            piece = self.stream.add(token)
            self.completion_tokens = len(self.stream.tokens)
            if piece.text or piece.finished:
                self.job.send(("piece", piece))
        return self.stream.finished and self.stream.stop_string is not None

    async def pieces(self):
        while True:
            kind, value = await self.job.events.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise APIError(500, f"generation failed: {value}", "server_error")
            else:
                self.stats = value
                self.ended_by_length = not self.stream.finished and self.completion_tokens >= self.max_tokens
                rest = self.stream.close()  # the worker is done with the stream
                if rest.text or rest.token_ids:
                    yield rest
                return

    @property
    def finish_reason(self) -> str:
        return "length" if self.ended_by_length else "stop"

    def usage(self) -> dict:
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": self.completion_tokens,
            "total_tokens": len(self.prompt) + self.completion_tokens,
        }


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="torchspec_ext.serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_authentication(app, state)
    add_routes(app, state)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered in the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(400, message, param=".".join(where) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def add_authentication(app: FastAPI, state: ServerState) -> None:
    """With an API key, every route but /health requires it (as a bearer token)."""

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                return error_response(
                    401, "Incorrect or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key"
                )
        return await call_next(request)


def add_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    def check_model(name: str) -> None:
        if name != engine.model_name:
            raise APIError(
                404, f"The model '{name}' does not exist; this server serves '{engine.model_name}'",
                param="model", code="model_not_found",
            )  # fmt: skip

    @app.get("/health")
    async def health():
        if state.scheduler.draining:
            return error_response(503, "shutting down", "server_shutting_down")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": state.created, "owned_by": "torchspec_ext"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        prompt = chat_prompt(engine.tokenizer, body.messages)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        gen = Generation(state, prompt, body, budget(state, prompt, asked))
        return await respond(gen, body, request, "chat", engine.model_name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        prompt = completion_prompt(engine.tokenizer, body.prompt, engine.vocab_size)
        check_prompt(engine, prompt)
        gen = Generation(state, prompt, body, budget(state, prompt, body.max_tokens))
        return await respond(gen, body, request, "text", engine.model_name)


async def respond(gen: Generation, body: Sampling, request: Request, kind: str, model_name: str):
    """A completion's answer: a stream of server-sent events, or one JSON object when it is done."""
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = stream_events(gen, kind, ident, created, model_name, include_usage, body.return_token_ids)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(watch_disconnect(request, gen))
    try:
        pieces = [p async for p in gen.pieces()]
    finally:
        watcher.cancel()
    text = "".join(p.text for p in pieces)
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    choice["finish_reason"] = gen.finish_reason
    out = {
        "id": ident,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model_name,
        "choices": [choice],
        "usage": gen.usage(),
        "speculative": speculative_info(gen.stats),
    }
    if body.return_token_ids:
        choice["token_ids"] = gen.stream.tokens[: gen.completion_tokens]
        out["prompt_token_ids"] = gen.prompt
    return out


async def watch_disconnect(request: Request, gen: Generation) -> None:
    """Cancels the generation when the client of a non-streaming request goes away."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gen.job.cancel()
                return


async def stream_events(gen: Generation, kind: str, ident, created, model, include_usage, token_ids):
    """Server-sent events: OpenAI's chunks, then ``data: [DONE]``. A client that goes away cancels the
    job (the generator is closed: ``finally``)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices, **extra):
        return {"id": ident, "object": obj, "created": created, "model": model, "choices": choices, **extra}

    def choice(text: str | None, finish=None, role=False, ids=None):
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if token_ids and ids is not None:
            c["token_ids"] = ids
        return c

    try:
        if kind == "chat":
            first = chunk([choice(None, role=True, ids=[])])
            if token_ids:
                first["prompt_token_ids"] = gen.prompt
            yield sse(first)
        try:
            async for piece in gen.pieces():
                if piece.text or piece.token_ids:
                    yield sse(chunk([choice(piece.text, ids=piece.token_ids)]))
        except APIError as exc:
            yield sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": None}})
            return
        yield sse(chunk([choice(None, finish=gen.finish_reason, ids=[])], speculative=speculative_info(gen.stats)))
        if include_usage:
            yield sse(chunk([], usage=gen.usage()))
        yield "data: [DONE]\n\n"
    finally:
        if gen.stats is None:
            gen.job.cancel()


def prometheus_text(state: ServerState) -> str:
    s = state.scheduler.stats
    acceptance, rate, window = s.rolling()
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP torchspec_{name} {help_}")
        lines.append(f"# TYPE torchspec_{name} {kind}")
        for labels, value in samples:
            lines.append(f"torchspec_{name}{labels} {value}")

    with s.lock:
        metric(
            "requests_total", "counter", "Requests finished, by outcome",
            [(f'{{status="{k}"}}', v) for k, v in s.requests.items()],
        )  # fmt: skip
        metric("prompt_tokens_total", "counter", "Prompt tokens of the requests run", [("", s.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated", [("", s.generated_tokens)])
        metric("target_forwards_total", "counter", "Verification passes of the target", [("", s.target_forwards)])
        metric("decode_seconds_total", "counter", "Seconds spent decoding", [("", round(s.decode_seconds, 6))])
        metric("draft_updates_total", "counter", "Draft weight updates put into the engine", [("", s.draft_updates)])
        metric("decode_steps_total", "counter", "Decoding steps (one target forward each)", [("", s.steps)])
        metric(
            "decode_step_requests_total", "counter", "Requests in the decoding steps, summed (/ steps: the mean batch)",
            [("", s.step_requests)],
        )  # fmt: skip
    metric(
        "acceptance_length", "gauge", f"Tokens per target forward over the last {window} requests", [("", acceptance)]
    )
    metric("tokens_per_second", "gauge", f"Decoding tokens/s over the last {window} requests", [("", rate)])
    metric("rolling_window_requests", "gauge", "Requests in the rolling window", [("", window)])
    metric("queue_depth", "gauge", "Requests waiting", [("", state.scheduler.waiting)])
    metric("requests_running", "gauge", "Requests being decoded", [("", len(state.scheduler.running))])
    learner = state.learner
    if learner is not None:
        metric("learner_steps_total", "counter", "Training steps of the draft on served traffic", [("", learner.steps)])
        metric("learner_requests_total", "counter", "Requests added to the replay buffer", [("", learner.requests)])
        metric("learner_replay_positions", "gauge", "Positions in the replay buffer", [("", learner.buffer.positions)])
        metric("learner_loss", "gauge", "Loss of the last training step", [("", learner.last_loss)])
        metric("learner_train_seconds_total", "counter", "Seconds spent in training steps",
               [("", round(learner.train_seconds, 6))])  # fmt: skip
        metric("learner_errors_total", "counter", "Training steps that failed", [("", learner.errors)])
    return "\n".join(lines) + "\n"
