"""The HTTP API: OpenAI-compatible completions, chat, embeddings and models, task endpoints, health, metrics.

``create_app(registry)`` builds the FastAPI application around a ``ModelRegistry``. Generation goes
through one ``Engine`` (continuous batching, see engine.py); embeddings and task endpoints run their
forward pass in a worker thread. Every error is a 4xx/5xx with OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: validation errors (pydantic's 422) become 400s,
an unknown model or adapter is a 404, a full queue a 429.

One pure ASGI middleware (``Gate``) checks the API key, limits the body size and records request
metrics; it is not a ``BaseHTTPMiddleware``, which would buffer streams and hide client disconnects.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import importlib.util
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from featherlm.errors import FeatherError
from featherlm.generate import GenerationConfig
from featherlm.serve import schemas as S
from featherlm.serve.engine import Engine, Event, QueueFull, Ticket
from featherlm.serve.metrics import Metrics
from featherlm.serve.registry import Entry, ModelRegistry, UnknownModel
from featherlm.serve.tasks import embed, truncate_all

log = logging.getLogger("featherlm.serve")

PUBLIC_PATHS = ("/health", "/")  # and /static/*: the UI page and its assets; the UI sends the key itself
MAX_ROWS_PER_REQUEST = 64  # prompts x n of one completion request


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = 2048  # new tokens per choice; a request asking for more gets a 400
    max_body_bytes: int = 8 * 1024 * 1024  # a body above this (by Content-Length, or as it arrives chunked): 413


class BodyTooLarge(StarletteHTTPException):
    """A request body (chunked, or longer than its Content-Length said) grew past ``Limits.max_body_bytes``.

    An HTTPException, so that FastAPI's body reading passes it on as it is (rather than as a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class APIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


# ----------------------------------------------------------------------------- middleware


class Gate:
    """Authentication, body-size limit and request metrics for every HTTP request (pure ASGI)."""

    def __init__(self, app, *, api_key: str | None, metrics: Metrics, limits: Limits,
                 routes: Callable[[], list]) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics, self.limits, self.routes = metrics, limits, routes
        self._known: set[str] | None = None

    def endpoint(self, path: str) -> str:
        """A bounded set of label values: route paths, else a family name, else "other"."""
        if self._known is None:
            self._known = {r.path for r in self.routes() if "{" not in getattr(r, "path", "{")}
        if path in self._known:
            return path
        if path.startswith("/static/"):
            return "/static"
        if path.startswith("/docs/"):
            return "/docs"
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return "other"

    def authorised(self, scope) -> bool:
        path = scope["path"]
        if self.key is None or path in PUBLIC_PATHS or path.startswith("/static/"):
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = self.endpoint(scope["path"])
        state = {"status": None, "done": False}

        async def tracked_send(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True

        try:
            if not self.authorised(scope):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, tracked_send)
                return
            limit = self.limits.max_body_bytes
            length = dict(scope.get("headers") or []).get(b"content-length", b"0")
            if length.isdigit() and int(length) > limit:
                response = error_response(413, f"request body over {limit} bytes", code="body_too_large")
                await response(scope, receive, tracked_send)
                return
            received = 0

            async def limited_receive():  # a chunked body has no Content-Length: count what arrives
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            await self.app(scope, limited_receive, tracked_send)
        finally:
            # a response that started but never finished: the client went away (nginx's 499)
            status = state["status"] if state["done"] or state["status"] is None else 499
            self.metrics.observe_request(endpoint, status or 500, time.perf_counter() - start)


class EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends: finished, failed, or the
    client disconnected before or during the stream (Starlette cancels the body iterator then)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- the application


def create_app(registry: ModelRegistry, *, api_key: str | None = None, max_queue: int = 64, max_batch: int = 32,
               limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving ``registry``'s models.

    ``api_key``: every path but /health, / and /static/* then needs ``Authorization: Bearer KEY``.
    ``max_batch``: rows decoded together; ``max_queue``: requests waiting beyond that before a 429.
    The generation engine starts and stops with the app (its lifespan).
    """
    limits = limits or Limits()
    engine = Engine(registry.decoders(), max_batch=max_batch, max_queue=max_queue)
    metrics = Metrics()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    # /docs is served from local files by mount_docs (FastAPI's default page loads Swagger from a CDN)
    app = FastAPI(title="featherlm", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API (completions, chat, embeddings) and task endpoints for "
                              "featherlm models. Send `Authorization: Bearer KEY` when the server has an API key.")
    app.state.registry, app.state.engine, app.state.metrics, app.state.limits = registry, engine, metrics, limits
    errors = {400: {"model": S.ErrorResponse}, 404: {"model": S.ErrorResponse}}

    # ----- errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, type=e.type, param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                                  code="invalid_json")
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = where[0] if where else None
        path = ".".join(where) or "request body"
        return error_response(400, f"{path}: {first.get('msg', 'invalid value')}", param=param,
                              code="invalid_value")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge):
        return error_response(413, e.detail, code="body_too_large")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return error_response(e.status_code, message, type="invalid_request_error", headers=e.headers)

    @app.exception_handler(UnknownModel)
    async def _unknown(request: Request, e: UnknownModel):
        return error_response(404, e.message, param=e.param, code="model_not_found")

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, e: QueueFull):
        return error_response(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                              code="queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(FeatherError)
    async def _feather(request: Request, e: FeatherError):
        return error_response(400, str(e), code="invalid_request")

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", type="server_error")

    # ----- models, health, metrics
    def card(entry: Entry) -> S.ModelCard:
        return S.ModelCard(id=entry.name, created=started, **entry.describe())

    @app.get("/v1/models", response_model=S.ModelList, tags=["OpenAI"])
    async def list_models() -> S.ModelList:
        """The served models: bases by name, adapters as `base:adapter`."""
        return S.ModelList(data=[card(e) for e in registry.entries()])

    @app.get("/v1/models/{model:path}", response_model=S.ModelCard, responses=errors, tags=["OpenAI"])
    async def get_model(model: str) -> S.ModelCard:
        return card(registry.entry(model))

    @app.get("/health", tags=["server"])
    async def health() -> dict:
        """Liveness and load: no API key needed (so the model names are only listed without one)."""
        stats = engine.stats()
        models = {} if api_key else {"models": registry.names()}
        return {"status": "ok", **models, "queued": stats["queued"], "running": stats["running"]}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["server"])
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format: requests, latency and time-to-first-token histograms, tokens."""
        s = engine.stats()
        extra = [("featherlm_queue_depth", "gauge", "Generation requests waiting to join a batch.", s["queued"]),
                 ("featherlm_batch_rows", "gauge", "Rows (choices) being decoded now.", s["running"]),
                 ("featherlm_decode_steps_total", "counter", "Batched decode steps run.", s["steps"]),
                 ("featherlm_decode_rows_total", "counter", "Rows over all decode steps (mean batch size: "
                  "rows / steps).", s["step_rows"]),
                 ("featherlm_sampled_tokens_total", "counter", "Tokens sampled by the engine, unfinished and "
                  "cancelled requests included.", s["sampled"])]
        return PlainTextResponse(metrics.render(extra), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ----- generation
    @app.post("/v1/completions", response_model=S.Completion, responses=errors, tags=["OpenAI"])
    async def completions(body: S.CompletionRequest, request: Request):
        """Continue one or more prompts. `stream: true` answers with server-sent events ending in `[DONE]`."""
        entry = generation_entry(registry, body.model)
        if body.echo or body.suffix is not None or (body.best_of or 1) > 1:
            raise APIError(400, "echo, suffix and best_of are not supported", param="echo")
        prompts = completion_prompts(entry, body.prompt)
        return await generate(request, entry, body, prompts, chat=False)

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses=errors, tags=["OpenAI"])
    async def chat_completions(body: S.ChatCompletionRequest, request: Request):
        """Answer a conversation, rendered with the model's chat template."""
        entry = generation_entry(registry, body.model)
        messages = [{"role": m.role, "content": message_text(m.content), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        text = entry.lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = entry.lm.tokenizer.encode(text)
        check_context(entry, [prompt], "messages")
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await generate(request, entry, body, [prompt], chat=True)

    async def generate(request: Request, entry: Entry, body: S._Sampling, prompts: list[list[int]], chat: bool):
        cfg = sampling_config(entry, body, prompts, limits)
        engine.start()  # a no-op once running; an app used without its lifespan (a bare TestClient) still serves
        loop = asyncio.get_running_loop()
        if body.stream:
            queue: asyncio.Queue[Event] = asyncio.Queue()

            def sink(event: Event) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, event)

            ticket = engine.submit(entry.name, prompts, cfg, sink, n=body.n, ignore_eos=body.ignore_eos)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(queue, entry, len(prompts) * body.n, chat, include_usage)
            return EventStream(events, ticket.cancel)
        done = loop.create_future()
        collected: list[Event] = []

        def collect(event: Event) -> None:  # on the engine thread: keep events, wake the handler at the end
            collected.append(event)
            if event.kind in ("done", "error"):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        ticket = engine.submit(entry.name, prompts, cfg, collect, n=body.n, ignore_eos=body.ignore_eos)
        await until_done_or_gone(request, done, ticket)
        return full_response(collected, entry, len(prompts) * body.n, chat)

    async def stream_events(queue: asyncio.Queue, entry: Entry, choices: int, chat: bool,
                            include_usage: bool) -> AsyncIterator[str]:
        rid, created = new_id(chat), int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return sse({"id": rid, "object": kind, "created": created, "model": entry.name, "choices": [choice]})

        if chat:
            for i in range(choices):
                yield chunk(i, None, None, role=True)
        while True:
            event = await queue.get()
            if event.kind == "text":
                yield chunk(event.index, event.text, None)
            elif event.kind == "finish":
                yield chunk(event.index, None, event.finish_reason)
            elif event.kind == "done":
                metrics.observe_generation(entry.name, event.prompt_tokens, event.completion_tokens, event.ttft)
                if include_usage:
                    yield sse({"id": rid, "object": kind, "created": created, "model": entry.name, "choices": [],
                               "usage": usage(event)})
                break
            else:  # error: the stream has begun with 200, so the error travels as an event
                yield sse(error_body(event.text, "server_error"))
                break
        yield sse("[DONE]")

    def full_response(events: list[Event], entry: Entry, choices: int, chat: bool) -> dict:
        texts, reasons = [""] * choices, [None] * choices
        last = events[-1]
        if last.kind == "error":
            raise APIError(500, last.text, type="server_error")
        for e in events:
            if e.kind == "text":
                texts[e.index] += e.text
            elif e.kind == "finish":
                reasons[e.index] = e.finish_reason
        metrics.observe_generation(entry.name, last.prompt_tokens, last.completion_tokens, last.ttft)
        base = {"id": new_id(chat), "created": int(time.time()), "model": entry.name, "usage": usage(last),
                "system_fingerprint": None}
        if chat:
            return {**base, "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]}
        return {**base, "object": "text_completion", "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]}

    # ----- embeddings and tasks
    @app.post("/v1/embeddings", response_model=S.EmbeddingList, responses=errors, tags=["OpenAI"])
    async def embeddings(body: S.EmbeddingRequest) -> dict:
        """Mean-pooled, L2-normalised final hidden states (sentence-transformers' recipe)."""
        entry = registry.entry(body.model)
        if body.dimensions is not None and body.dimensions != entry.lm.model.config.d_model:
            raise APIError(400, f"dimensions: this model gives {entry.lm.model.config.d_model}-dimensional "
                                "embeddings and cannot shorten them", param="dimensions")
        ids = input_ids(entry, body.input)
        tok = entry.lm.tokenizer
        pad = tok.pad_id if tok is not None and tok.pad_id is not None else 0
        vectors = await run_in_threadpool(embed, entry.lm.model, ids, pad)
        data = []
        for i, v in enumerate(vectors):
            value = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                     else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": entry.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify", response_model=S.ClassifyResponse, responses=errors, tags=["tasks"])
    async def classify_texts(body: S.TextsRequest) -> dict:
        """Label texts with a classification run: the predicted label, its probability, every label's."""
        from featherlm.evaluate import classify

        entry = task_entry(registry, body.model, "classification", "/v1/classify")
        texts = text_list(body.input)
        data = await run_in_threadpool(lambda: classify(entry.head, entry.lm.tokenizer, texts,
                                                        max_seq_len=entry.max_seq_len))
        return {"object": "list", "model": entry.name, "data": data}

    @app.post("/v1/ner", response_model=S.NerResponse, responses=errors, tags=["tasks"])
    async def ner(body: S.TextsRequest) -> dict:
        """Named entities of each text with an NER run: `[[{entity, type, start, end, text, score}]]`."""
        entry = task_entry(registry, body.model, "ner", "/v1/ner")
        predict = task_function("predict_entities", "ner")
        texts = text_list(body.input)
        data = await run_in_threadpool(lambda: predict(entry.head, entry.lm.tokenizer, texts,
                                                       **entry.options))
        return {"object": "list", "model": entry.name, "data": data}

    @app.post("/v1/qa", response_model=S.QAResponse, responses=errors, tags=["tasks"])
    async def qa(body: S.QARequest) -> dict:
        """Extractive question answering with a QA run: the answer span of the context,
        `{model, answer, start, end, score}` with `context[start:end] == answer`."""
        entry = task_entry(registry, body.model, "qa", "/v1/qa")
        answer = task_function("answer_questions", "qa")
        result = await run_in_threadpool(lambda: answer(entry.head, entry.lm.tokenizer,
                                                        [body.question], [body.context], **entry.options))
        return {"model": entry.name, **result[0]}

    app.add_middleware(Gate, api_key=api_key, metrics=metrics, limits=limits, routes=lambda: app.routes)
    if importlib.util.find_spec("featherlm.serve.ui") is not None:
        from featherlm.serve.ui import mount_docs, mount_ui

        mount_ui(app)
        mount_docs(app)
    return app


# ----------------------------------------------------------------------------- request helpers


def _version() -> str:
    """featherlm's version from the installed package metadata (serve may not import the package root)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("featherlm")
    except PackageNotFoundError:
        return "0+unknown"


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"


def usage(done: Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def generation_entry(registry: ModelRegistry, name: str) -> Entry:
    entry = registry.entry(name)
    if not entry.generates:
        raise APIError(400, f"model {entry.name!r} cannot generate text (it is a {entry.task} model); "
                            "use a decoder or an sft/lm adapter", param="model", code="model_not_generative")
    return entry


def task_entry(registry: ModelRegistry, name: str, task: str, route: str) -> Entry:
    entry = registry.entry(name)
    if entry.task != task or entry.head is None:
        raise APIError(400, f"{route} needs a {task} run served with --adapter NAME=RUN_DIR; model {entry.name!r} "
                            f"is a {entry.task} model", param="model", code="wrong_model_task")
    return entry


def task_function(name: str, task: str):
    """``featherlm.evaluate.<name>``, imported when a request needs it (the task may not exist yet)."""
    import featherlm.evaluate as evaluate

    fn = getattr(evaluate, name, None)
    if fn is None:
        raise APIError(400, f"this featherlm has no {task} prediction yet (featherlm.evaluate.{name} is missing)",
                       code="task_not_available")
    return fn


def message_text(content: str | list[S.TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


def text_list(value: str | list[str]) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts or len(texts) > S.MAX_INPUTS:
        raise APIError(400, f"input: give 1 to {S.MAX_INPUTS} texts, got {len(texts)}", param="input")
    return texts


def token_lists(value, param: str) -> list[list[int]] | None:
    """Token-id inputs as a list of lists; None for text inputs."""
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        return [list(value)]
    if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        return [list(x) for x in value]
    return None


def check_ids(entry: Entry, batch: list[list[int]], param: str) -> None:
    vocab = entry.lm.model.config.vocab_size
    for ids in batch:
        if not ids:
            raise APIError(400, f"{param}: an empty list of token ids", param=param)
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"{param}: token ids must be in [0, {vocab})", param=param)


def completion_prompts(entry: Entry, prompt) -> list[list[int]]:
    batch = token_lists(prompt, "prompt")
    if batch is None:
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts:
            raise APIError(400, "prompt: give a text or a list of texts", param="prompt")
        batch = entry.lm.tokenizer.encode_batch(texts)
    check_ids(entry, batch, "prompt")
    check_context(entry, batch, "prompt")
    return batch


def check_context(entry: Entry, batch: list[list[int]], param: str) -> None:
    """A prompt must leave room for at least one new token in the model's context."""
    context = entry.lm.model.config.max_seq_len
    for ids in batch:
        if len(ids) >= context:
            raise APIError(400, f"prompt has {len(ids)} tokens but the model's context is {context} tokens",
                           param=param, code="context_length_exceeded")


def input_ids(entry: Entry, value) -> list[list[int]]:
    """Embedding inputs as token ids, cut to the model's embedding length."""
    from featherlm.data.tasks import special_affixes

    batch = token_lists(value, "input")
    tok = entry.lm.tokenizer
    if batch is None:
        texts = text_list(value)
        if tok is None:
            raise APIError(400, f"model {entry.name!r} has no tokenizer: send token ids", param="input")
        batch = tok.encode_batch(texts)
        if any(not ids for ids in batch):
            raise APIError(400, "input: an empty text has nothing to embed", param="input")
        return truncate_all(batch, entry.max_seq_len, special_affixes(tok))
    if len(batch) > S.MAX_INPUTS:
        raise APIError(400, f"input: at most {S.MAX_INPUTS} inputs", param="input")
    check_ids(entry, batch, "input")
    return [ids[:entry.max_seq_len] for ids in batch]


def sampling_config(entry: Entry, body: S._Sampling, prompts: list[list[int]], limits: Limits) -> GenerationConfig:
    """The GenerationConfig of a request, after the checks pydantic's field bounds cannot express."""
    if body.presence_penalty or body.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported (use repetition_penalty)",
                       param="presence_penalty" if body.presence_penalty else "frequency_penalty")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {body.max_tokens}; this server allows at most {limits.max_tokens}",
                       param="max_tokens", code="max_tokens_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > S.MAX_STOP:
        raise APIError(400, f"stop: at most {S.MAX_STOP} stop strings", param="stop")
    if len(prompts) * body.n > MAX_ROWS_PER_REQUEST:
        raise APIError(400, f"prompts x n is {len(prompts) * body.n}; at most {MAX_ROWS_PER_REQUEST} per request",
                       param="n")
    # below 1e-5 sampling is argmax in all but name, and logits / temperature could overflow to inf
    temperature = body.temperature if body.temperature >= 1e-5 else 0.0
    # the whole answer must fit in the context: max_tokens is clamped per prompt (as featherlm.generate does)
    return GenerationConfig(max_new_tokens=body.max_tokens or limits.max_tokens, temperature=temperature,
                            top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                            repetition_penalty=body.repetition_penalty, stop=stop, seed=body.seed)


async def until_done_or_gone(request: Request, done: asyncio.Future, ticket: Ticket) -> None:
    """Wait for a non-streamed request; cancel it if the client disconnects first."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({done, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            raise APIError(499, "client disconnected", code="client_closed")
    finally:
        watcher.cancel()
        if not done.done():
            ticket.cancel()
