"""The web UI: one static page (chat, task playground, attention view) and the two JSON routes only it needs.

The page is plain HTML, CSS and JavaScript in ``static/``, served by the same process as the API, so a
browser needs nothing from the internet (a Content-Security-Policy on ``/`` makes that hold in the browser
too). Chat and the task forms call the ordinary OpenAI-style endpoints; the attention view needs two
more that look inside the model:

- ``POST /v1/attention`` {model, text, layer?, head?} -> the (T, T) attention probabilities of one layer
  and head, with the tokens that label its rows (queries) and columns (keys; ``key_tokens`` when a
  prefix-tuning adapter makes them differ).
- ``POST /v1/next_token`` {model, text | messages, top_k} -> the most likely next tokens, their
  probabilities, and the prompt each would make (to step through a generation by clicking).

Both run one forward pass under ``registry.lock`` (the engine's decode steps share the model) and answer
user mistakes with OpenAI-style error bodies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from featherlm.errors import FeatherError

STATIC = Path(__file__).resolve().parent / "static"
# A map is T x T cells per head: 128 tokens give 16k cells, about what a page draws smoothly and a person
# can read; longer prompts would mostly send numbers nobody looks at (256 KB of JSON per head at T = 128).
MAX_ATTENTION_TOKENS = 128
MAX_TOP_K = 100  # the table is for reading; beyond 100 rows every probability rounds to zero anyway
# Only same-origin resources: the page must work offline and load nothing from elsewhere.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class AttentionRequest(BaseModel):
    """Body of ``POST /v1/attention``."""

    model: str = Field(description="A name from GET /v1/models.")
    text: str = Field(description=f"The prompt; at most {MAX_ATTENTION_TOKENS} tokens (and the model's context).")
    layer: int = Field(0, description="Layer index, 0-based.")
    head: int = Field(0, description="Head index, 0-based.")


class AttentionResponse(BaseModel):
    tokens: list[str] = Field(description="The query positions (rows): the prompt's tokens, after the virtual "
                                          "tokens of a prompt-tuning adapter if one is active.")
    key_tokens: list[str] | None = Field(None, description="The key positions (columns) where they differ from "
                                                           "`tokens`: a prefix-tuning adapter adds key/value slots.")
    n_layer: int
    n_head: int
    layer: int
    head: int
    weights: list[list[float]] = Field(description="(T, S): row i = how query i spreads over the keys; sums to 1.")


class NextTokenRequest(BaseModel):
    """Body of ``POST /v1/next_token``: a plain prompt (``text``) or a chat (``messages``), not both."""

    model: str
    text: str | None = None
    messages: list[dict[str, Any]] | None = Field(
        None, description="Chat messages; rendered with the model's chat template and an assistant prompt.")
    top_k: int = Field(10, description=f"How many tokens to list, 1 to {MAX_TOP_K}.")


class TopToken(BaseModel):
    token: str
    id: int
    prob: float
    text: str = Field(description="The prompt with this token appended, as the tokenizer decodes it: what the page "
                                  "puts in the prompt box to step through a generation one token at a time.")


class NextTokenResponse(BaseModel):
    tokens: list[str] = Field(description="The prompt's tokens (after the chat template, if any).")
    top: list[TopToken]


class UIError(Exception):
    """A request the UI routes refuse; becomes an OpenAI-style error body with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def mount_ui(app: FastAPI) -> None:
    """Serve the page at ``/``, its assets at ``/static/*``, and add the attention and next-token routes."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        # no-cache: the page is tiny and must never be stale against the API it talks to
        headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=headers)

    # Plain `def` routes: FastAPI runs them in its thread pool, so a forward pass never blocks the event loop.
    @app.post("/v1/attention", response_model=AttentionResponse, tags=["ui"],
              summary="Attention probabilities of one layer and head over a prompt's tokens")
    def attention(body: AttentionRequest, request: Request) -> Any:
        try:
            return attention_map(request.app.state.registry, body)
        except UIError as e:
            return e.response()

    @app.post("/v1/next_token", response_model=NextTokenResponse, tags=["ui"],
              summary="The most likely next tokens after a prompt, with their probabilities")
    def next_token(body: NextTokenRequest, request: Request) -> Any:
        try:
            return next_token_probs(request.app.state.registry, body)
        except UIError as e:
            return e.response()


def mount_docs(app: FastAPI) -> None:
    """``/docs``: the interactive OpenAPI page (Swagger UI) from the ``swagger-ui-bundle`` package's files,
    served under ``/docs/assets``, so it works offline like the UI (FastAPI's own page fetches Swagger
    from a CDN). Without that package ``/docs`` says where the machine-readable document is."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger_ui_path is None:
            return HTMLResponse('<p>The API is described by <a href="/openapi.json">/openapi.json</a> '
                                "(install swagger-ui-bundle for the interactive page).</p>")
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")


# ----------------------------------------------------------------------------- the work behind the routes


def attention_map(registry: Any, body: AttentionRequest) -> dict[str, Any]:
    """One forward pass with attention maps kept; returns the chosen layer and head as nested lists."""
    lm = _get_model(registry, body.model)
    cfg = lm.model.config
    if not 0 <= body.layer < cfg.n_layer:
        raise UIError(400, f"layer must be in [0, {cfg.n_layer - 1}], got {body.layer}", "layer", "invalid_value")
    if not 0 <= body.head < cfg.n_head:
        raise UIError(400, f"head must be in [0, {cfg.n_head - 1}], got {body.head}", "head", "invalid_value")
    ids = _encode(lm, body.text, "text", min(MAX_ATTENTION_TOKENS, cfg.max_seq_len))
    with registry.lock, torch.inference_mode():
        out = lm.model(torch.tensor([ids], device=_device(lm)), output_attentions=True)
        weights = out.attentions[body.layer][0, body.head].float().cpu()  # (T, S)
    # A plain model gives S == T. Prompt tuning runs P virtual tokens before the prompt (rows and columns:
    # P + T); prefix tuning adds P key/value slots that every query sees (columns only).
    queries = [f"<virtual {i}>" for i in range(weights.shape[0] - len(ids))] + _token_texts(lm.tokenizer, ids)
    keys = [f"<prefix {i}>" for i in range(weights.shape[1] - len(queries))] + queries
    return {"tokens": queries, "key_tokens": keys if keys != queries else None, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "layer": body.layer, "head": body.head, "weights": weights.tolist()}


def next_token_probs(registry: Any, body: NextTokenRequest) -> dict[str, Any]:
    """Softmax over the last position's logits; the ``top_k`` largest, most likely first."""
    if (body.text is None) == (body.messages is None):
        raise UIError(400, "give either 'text' or 'messages'", "text", "invalid_value")
    if not 1 <= body.top_k <= MAX_TOP_K:
        raise UIError(400, f"top_k must be in [1, {MAX_TOP_K}], got {body.top_k}", "top_k", "invalid_value")
    lm = _get_model(registry, body.model)
    if not lm.model.config.causal:
        raise UIError(400, f"{body.model} is an encoder; it does not predict a next token", "model",
                      "model_not_supported")
    text, param = body.text, "text"
    if body.messages is not None:
        param = "messages"
        if not body.messages:
            raise UIError(400, "messages must not be empty", param, "invalid_value")
        try:
            text = lm.tokenizer.apply_chat_template(body.messages, add_generation_prompt=True)
        except FeatherError as e:
            raise UIError(400, str(e), param, "invalid_value") from None
    ids = _encode(lm, text, param, lm.model.config.max_seq_len)
    with registry.lock, torch.inference_mode():
        logits = lm.model(torch.tensor([ids], device=_device(lm)), last_only=True).logits  # (1, 1, V)
        probs = logits[0, -1].float().softmax(-1).cpu()  # (V,)
    # The embedding may be padded past the tokenizer's vocabulary; those ids are no tokens at all.
    probs = probs[: lm.tokenizer.vocab_size]
    top = probs.topk(min(body.top_k, probs.numel()))
    top_ids = top.indices.tolist()
    rows = zip(_token_texts(lm.tokenizer, top_ids), top_ids, top.values.tolist(), strict=True)
    # Decoding ids + [id] rather than text + token: word-level and SentencePiece tokenizers put the spaces
    # between tokens in their decoder, so plain concatenation would glue words together.
    return {"tokens": _token_texts(lm.tokenizer, ids),
            "top": [{"token": t, "id": i, "prob": p, "text": lm.tokenizer.decode([*ids, i], skip_special_tokens=False)}
                    for t, i, p in rows]}


def _get_model(registry: Any, name: str) -> Any:
    """The registry's model, or a 404 naming what is served (the registry never loads paths)."""
    try:
        lm = registry.get(name)
    except LookupError as e:  # the server's UnknownModel (a KeyError) carries a message naming what is served
        message = getattr(e, "message", None) or f"the model {name!r} does not exist; models: {registry.names()}"
        raise UIError(404, message, "model", "model_not_found") from None
    if lm.tokenizer is None:
        raise UIError(400, f"{name} has no tokenizer; the UI needs text in", "model", "model_not_supported")
    return lm


def _encode(lm: Any, text: str | None, param: str, limit: int) -> list[int]:
    """Token ids of a non-empty prompt of at most ``limit`` tokens."""
    if text is None or not text.strip():
        raise UIError(400, f"{param} must not be empty", param, "invalid_value")
    ids = lm.tokenizer.encode(text)
    if not ids:
        raise UIError(400, f"{param} has no tokens", param, "invalid_value")
    if len(ids) > limit:
        raise UIError(400, f"{param} has {len(ids)} tokens; the limit here is {limit}", param,
                      "context_length_exceeded")
    return ids


def _token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id as the text it stands for (" the" rather than "Ġthe"); special tokens by name."""
    return [tokenizer.decode([i], skip_special_tokens=False) or tokenizer.id_to_token(i) or f"<{i}>" for i in ids]


def _device(lm: Any) -> torch.device:
    return lm.model.embed_tokens.weight.device
