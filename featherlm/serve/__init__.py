"""Serving: an OpenAI-compatible HTTP API with continuous batching, task endpoints, health and metrics.

    from featherlm.serve import serve
    serve(models=["smollm2-135m-instruct", "minilm-l6"], adapters={"sst2": "runs/sst2"}, port=8000)

or, to embed the app elsewhere (tests, another ASGI server)::

    from featherlm.serve import ModelRegistry, create_app
    app = create_app(ModelRegistry.load(["smollm2-135m-instruct"]), api_key="secret")

Layout: registry.py (names -> models), engine.py (batched decoding on a background thread), app.py
(routes, errors, auth), schemas.py (request/response bodies), metrics.py (Prometheus text),
tasks.py (embeddings).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from featherlm.errors import ConfigError
from featherlm.serve.app import Limits, create_app
from featherlm.serve.engine import Engine, Event, QueueFull
from featherlm.serve.registry import Entry, ModelRegistry, UnknownModel

DEFAULT_MODELS = ("smollm2-135m-instruct",)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose a server without an API key beyond this machine, unless asked to (``insecure``)."""
    if not is_loopback(host) and not api_key and not insecure:
        raise ConfigError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                          "the models. Give --api-key KEY (or FEATHERLM_API_KEY), or --insecure if this is "
                          "really wanted")


def serve(models: Sequence[str] = DEFAULT_MODELS, adapters: Mapping[str, str] | None = None, *,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, insecure: bool = False,
          dtype: str = "bfloat16", max_batch: int = 32, max_queue: int = 64, max_tokens: int = 2048,
          log_level: str = "info") -> None:
    """Load the models and serve them over HTTP until interrupted.

    ``models``: embedded names, folders, .gguf files or hub ids, each optionally ``NAME=SPEC``;
    ``adapters``: NAME -> fine-tuning run directory (served as ``base:NAME``). bf16 weights by default:
    decoding reads every weight once per token, so half the bytes is faster on a CPU.
    """
    import uvicorn

    check_bind(host, api_key, insecure)
    if not 0 <= port < 65536:
        raise ConfigError(f"port must be in [0, 65535], got {port}")
    if max_batch < 1 or max_queue < 0 or max_tokens < 1:
        raise ConfigError(f"need max_batch >= 1, max_queue >= 0 and max_tokens >= 1, got {max_batch}, {max_queue}, "
                          f"{max_tokens}")
    registry = ModelRegistry.load(list(models), adapters, dtype=dtype)
    app = create_app(registry, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     limits=Limits(max_tokens=max_tokens))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["serve", "create_app", "check_bind", "is_loopback", "ModelRegistry", "Entry", "UnknownModel", "Engine",
           "Event", "QueueFull", "Limits", "DEFAULT_MODELS"]
