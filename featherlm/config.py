"""Configuration dataclasses.

One ``ModelConfig`` describes every family (GPT-2, Llama, BERT, T5): the differences between families
are field values, never separate classes. Loading from a dict is strict: an unknown key is a
``ConfigError`` that names the closest valid key, and values are coerced by their annotation.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from featherlm.errors import ConfigError

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Shape and flavour of a transformer.

    The defaults describe a tiny Llama-style decoder, handy for tests; real checkpoints fill every
    field from their own config (see ``featherlm.checkpoint``).
    """

    family: Literal["llama", "gpt2", "bert", "t5"] = "llama"
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 4  # < n_head means grouped-query attention (Llama 2/3, SmolLM2)
    d_model: int = 32
    d_ff: int = 64
    vocab_size: int = 256
    max_seq_len: int = 512
    head_dim: int | None = None  # None: d_model // n_head
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3 style {"rope_type": "llama3", ...}; None: plain RoPE
    norm_eps: float = 1e-5
    # Architecture switches; the family presets below set them consistently.
    causal: bool = True  # decoder (True) or bidirectional encoder (False)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_position: Literal["pre", "post"] = "pre"  # BERT is post-LN
    mlp: Literal["gated", "plain"] = "gated"  # gated: SwiGLU-style gate*up; plain: up -> act -> down
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    position: Literal["rope", "learned", "sinusoidal", "relative"] = "rope"  # relative: T5's bucketed bias
    attn_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    tie_embeddings: bool = False  # lm_head shares embed_tokens.weight
    type_vocab_size: int = 0  # BERT token types (segment ids); 0 disables
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    final_norm: bool = True  # norm after the last block (pre-LN decoders)
    pooler: bool = False  # BERT pooler (dense + tanh on [CLS])
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02  # std of the random init; T5: its initializer_factor (stds follow the widths)
    # Encoder-decoder (T5). The model is then an encoder stack and a decoder stack of the blocks above
    # (featherlm.model.Seq2SeqTransformer); the stacks' own configs set causal and cross_attention.
    encoder_decoder: bool = False
    n_decoder_layer: int | None = None  # decoder blocks of an encoder-decoder; None: n_layer
    cross_attention: bool = False  # blocks also attend to an encoder's output (the decoder stack)
    decoder_start_token_id: int | None = None  # first decoder input of an encoder-decoder (T5: the pad id)
    relative_buckets: int = 32  # position "relative": buckets of T5's learned per-head position bias
    relative_max_distance: int = 128  # distances past this share the last bucket
    attn_scale: bool = True  # scores / sqrt(head_dim); T5 does not scale (it folds that into q_proj's init)
    scale_output: bool = False  # T5 with tied embeddings: hidden * d_model**-0.5 before the unembedding

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.encoder_decoder and self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.position == "relative" and not 2 <= self.relative_buckets <= self.relative_max_distance:
            raise ConfigError(f"relative_buckets must be in 2..relative_max_distance ({self.relative_max_distance}), "
                              f"got {self.relative_buckets}")

    @property
    def n_params_estimate(self) -> int:
        """Rough parameter count (embeddings + blocks), for messages before a model exists."""
        attn = self.d_model * self.head_dim * (2 * self.n_head + 2 * self.n_kv_head)
        mlp = self.d_model * self.d_ff * (3 if self.mlp == "gated" else 2)
        decoder = self.n_decoder_layer * (2 * attn + mlp) if self.encoder_decoder else 0  # + cross-attention
        return self.vocab_size * self.d_model + self.n_layer * (attn + mlp) + decoder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "model config") -> ModelConfig:
        return from_dict(cls, data, where=where)

    def save(self, path: str | Path) -> None:
        from featherlm.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_dict(data, where=str(path))


def preset(family: str, **overrides: Any) -> ModelConfig:
    """A tiny config of the given family; keyword overrides set any field (sizes, vocab...)."""
    base: dict[str, Any] = {
        "llama": {},
        "gpt2": dict(
            family="gpt2", norm="layernorm", mlp="plain", activation="gelu_tanh", position="learned",
            attn_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True, d_ff=128,
        ),
        "bert": dict(
            family="bert", causal=False, norm="layernorm", norm_position="post", mlp="plain",
            activation="gelu", position="learned", attn_bias=True, o_bias=True, mlp_bias=True,
            type_vocab_size=2, embed_norm=True, final_norm=False, pooler=True, norm_eps=1e-12,
            d_ff=128, pad_token_id=0,
        ),
        # the original T5 (ReLU MLP, tied and scaled output); T5 v1.1 / flan-t5 are mlp="gated",
        # activation="gelu_tanh", tie_embeddings=False, scale_output=False
        "t5": dict(
            family="t5", encoder_decoder=True, position="relative", mlp="plain", activation="relu", attn_scale=False,
            tie_embeddings=True, scale_output=True, norm_eps=1e-6, d_ff=128, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, initializer_range=1.0,
        ),
    }.get(family)
    if base is None:
        raise ConfigError(f"unknown family {family!r}; expected one of llama, gpt2, bert, t5")
    if family in ("bert", "t5") and "n_head" in overrides:
        overrides = {"n_kv_head": overrides["n_head"], **overrides}  # no grouped-query attention in these families
    return ModelConfig(**{**base, **overrides})


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build a (possibly nested) dataclass from a dict, strictly.

    Unknown keys raise ``ConfigError`` with the closest valid key; values are coerced to the
    annotated type (``"3e-4"`` -> float, ``"true"`` -> bool) so YAML and CLI strings both work.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = coerce(value, hints[key], where=f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def coerce(value: Any, annotation: Any, *, where: str) -> Any:
    """Convert ``value`` to ``annotation`` (int, float, bool, str, Literal, Optional, dataclass...)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where=where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where=where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [coerce(v, item, where=where) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(str(value), 0) if isinstance(value, str) else value
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            number = int(number)
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


__all__ = ["ModelConfig", "preset", "from_dict", "coerce", "field"]
