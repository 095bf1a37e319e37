"""Request and response bodies of the HTTP API (pydantic), so /docs shows every schema.

The OpenAI-compatible bodies follow OpenAI's field names and defaults. Fields OpenAI defines that the
server does not implement are either ignored when they cannot change the result (``user``,
``stream_options`` other than ``include_usage``) or refused with a 400 when they would (``logprobs``,
non-zero penalties, ``echo``, ``suffix``). Extensions shared with vLLM: ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per prompt: more is almost surely a mistake, and each one takes a batch row
MAX_STOP = 4  # OpenAI's limit
MAX_INPUTS = 2048  # embeddings / classify / ner inputs per request (OpenAI's embeddings limit)


class _Body(BaseModel):
    # unknown OpenAI fields (user, metadata, ...) change nothing; strict: a value of the wrong JSON type is a
    # 400, as OpenAI answers it, rather than quietly converted ("stream": "yes", "max_tokens": true, "n": "2");
    # an integer still passes where a number is expected ("temperature": 1)
    model_config = ConfigDict(extra="ignore", strict=True)


# ----------------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ----------------------------------------------------------------------------- generation


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(description="a served model: `base` or `base:adapter` (GET /v1/models lists them)")
    max_tokens: int | None = Field(None, ge=1, description="new tokens per choice (server limit applies)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description=f"choices per prompt (at most {MAX_N})")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings; not included in the output")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="same seed and settings: same output")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, description="not supported: must be 0")
    logprobs: Any = Field(None, description="not supported")
    # extensions (vLLM's names)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0: off)")
    min_p: float = Field(0.0, ge=0.0, lt=1.0, description="extension: drop tokens below min_p * p(best)")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension: CTRL-style, > 1 discourages "
                                                                          "repeats")
    ignore_eos: bool = Field(False, description="extension: keep generating past the end token (benchmarks)")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, several texts, token ids, or several lists of token ids")
    max_tokens: int | None = Field(16, ge=1, description="new tokens per choice (OpenAI's default: 16)")
    echo: bool = Field(False, description="not supported")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="not supported beyond 1")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


# ----------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")  # featherlm adds task, family, decoder, context_length, base, adapter

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "featherlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- embeddings and tasks


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"text, texts, token ids or lists of token ids (at most {MAX_INPUTS})")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="not supported: the model's width is used")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TextsRequest(_Body):
    model: str = Field(description="a classification (/v1/classify) or NER (/v1/ner) run served with "
                                   "--adapter NAME=RUN_DIR")
    input: str | list[str] = Field(description=f"one text or a list of texts (at most {MAX_INPUTS})")


class ClassLabel(BaseModel):
    label: str
    score: float = Field(description="probability of the predicted label")
    scores: dict[str, float] = Field(description="probability of every label")


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[ClassLabel]


class Entity(BaseModel):
    model_config = ConfigDict(extra="allow")

    entity: str = Field(description="the entity type (as `type`; Hugging Face's pipeline calls it entity_group)")
    type: str = Field(description="the entity type: the label's name without its B-/I- prefix, e.g. PER")
    start: int = Field(description="offset of the first character in the text (Python string index)")
    end: int = Field(description="offset after the last character: `text[start:end]` is the entity")
    text: str = Field(description="the entity as written in the text")
    score: float = Field(description="mean probability of the entity's word labels")


class NerResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[list[Entity]]


class QARequest(_Body):
    model: str = Field(description="an extractive-QA run served with --adapter NAME=RUN_DIR")
    question: str
    context: str


class QAResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    answer: str = Field(description="the answer, a span of the context (empty: no answer, for runs trained "
                                    "with unanswerable questions)")
    start: int = Field(description="offset of the answer's first character in the context")
    end: int = Field(description="offset after its last character: `context[start:end]` is the answer")
    score: float
