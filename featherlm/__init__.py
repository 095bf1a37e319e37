"""featherlm: build, pretrain, fine-tune, evaluate and serve transformer language models.

The public Python API::

    import featherlm
    lm = featherlm.load("smollm2-135m-instruct")      # or a HF folder, a .gguf file, a hub id
    print(lm.generate("The capital of France is", max_new_tokens=20).text)
    for piece in lm.stream("Tell me a joke"):          # streaming
        print(piece, end="", flush=True)
    model, tokenizer = featherlm.load("minilm-l6")    # also unpacks into module and tokenizer
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featherlm.config import ModelConfig
from featherlm.errors import CheckpointError, ConfigError, DataError, FeatherError, GenerationError
from featherlm.generate import GenerationConfig, GenerationResult, Timing
from featherlm.generate import generate as _generate
from featherlm.generate import generate_batch as _generate_batch
from featherlm.generate import stream as _stream
from featherlm.model import Transformer

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Weight formats `load` also takes besides DTYPES: "q4" = 4-bit linears (featherlm.model.quant), bf16 elsewhere.
QUANTIZED = ("q4",)


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from. Unpacks as ``model, tokenizer``."""

    model: Transformer
    tokenizer: object
    name: str
    files: list[Path] = field(default_factory=list)
    kind: str = ""
    stored_as: str = ""  # dtype or GGUF quantisation of the files (the model itself runs in `dtype`)

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def _prompt(self, prompt: str | list[dict]) -> str:
        if isinstance(prompt, list):  # chat messages
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return prompt

    def generate(self, prompt: str | list[dict], **options) -> GenerationResult:
        """Continue a prompt (or answer chat messages). Options: the GenerationConfig fields."""
        self.require_decoder()
        return _generate(self.model, self.tokenizer, self._prompt(prompt), GenerationConfig(**options))

    def generate_batch(self, prompts: list[str], **options) -> list[str]:
        self.require_decoder()
        return _generate_batch(self.model, self.tokenizer, prompts, GenerationConfig(**options))

    def stream(self, prompt: str | list[dict], **options) -> Iterator[str]:
        """Yield the continuation piece by piece as it is generated."""
        self.require_decoder()
        return _stream(self.model, self.tokenizer, self._prompt(prompt), GenerationConfig(**options))

    def require_decoder(self) -> None:
        if not self.model.config.causal:
            raise GenerationError(f"{self.name} is an encoder ({self.model.config.family}); it cannot generate text")
        if self.tokenizer is None:
            raise GenerationError(f"{self.name} has no tokenizer; text generation needs one")

    def info(self) -> dict:
        """What ``featherlm info`` prints."""
        c = self.model.config
        return {
            "name": self.name, "kind": self.kind, "family": c.family, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_kv_head": c.n_kv_head, "d_model": c.d_model, "d_ff": c.d_ff, "head_dim": c.head_dim,
            "vocab_size": c.vocab_size, "context_length": c.max_seq_len, "parameters": _num_params(self.model),
            "dtype": str(self.model.embed_tokens.weight.dtype).replace("torch.", ""), "stored_as": self.stored_as,
            "tokenizer_vocab_size": getattr(self.tokenizer, "vocab_size", None),
            "files": [str(f) for f in self.files],
            **_quant_info(self.model),
        }


def load(name: str | Path, *, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """Load a model by embedded name, local HF/featherlm folder, .gguf file or hub id."""
    from featherlm.checkpoint import build_model, read_checkpoint
    from featherlm.hub import resolve

    quantize = dtype in QUANTIZED
    if quantize:
        dtype = torch.bfloat16  # what everything but the 4-bit linears (embeddings, norms) is kept in
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {', '.join([*DTYPES, *QUANTIZED])}")
        dtype = DTYPES[dtype]
    checkpoint = read_checkpoint(resolve(name))
    model = build_model(checkpoint, dtype=dtype, device=device)
    if quantize:
        _to_int4(model, checkpoint)
    return LoadedModel(model, checkpoint.tokenizer, str(name), checkpoint.files, checkpoint.kind,
                       checkpoint.stored_as)


def _to_int4(model: Transformer, checkpoint) -> None:
    """``dtype="q4"``: a GGUF file's 4-bit linears (Q4_0/Q4_1/Q4_K) become Int4Linear from its own blocks,
    the rest (Q6_K, Q8_0 tensors, embeddings, norms) stays bf16; any other checkpoint has its linears
    quantised in groups of 32. A tied output layer stays the bf16 embedding (it is one tensor)."""
    from featherlm.model.quant import quantize_model

    if checkpoint.kind == "gguf":
        from featherlm.checkpoint.gguf import load_int4_linears

        load_int4_linears(model, checkpoint.files[0])
        model.int4_source = f"GGUF {checkpoint.stored_as or '4-bit'} blocks"
    else:
        quantize_model(model, group_size=32)
        model.int4_source = f"quantised from {checkpoint.stored_as or 'float'} weights"


def _num_params(model) -> int:
    """Parameters, with the weights of 4-bit layers (buffers, not nn.Parameters) counted too."""
    from featherlm.model.quant import int4_layers

    extra = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                for m in int4_layers(model).values())
    return model.num_params() + extra


def _quant_info(model: torch.nn.Module) -> dict:
    """For ``info()``: how many linears are 4-bit and the bytes of all weights (empty for float models)."""
    from featherlm.model.quant import int4_layers, weight_bytes

    layers = int4_layers(model)
    if not layers:
        return {}
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) + len(layers)
    groups = sorted({m.group_size for m in layers.values()})
    return {"quantized": {"format": "int4", "group_size": groups[0] if len(groups) == 1 else groups,
                          "layers": len(layers), "linears": linears,
                          "source": getattr(model, "int4_source", "")},
            "weights_bytes": weight_bytes(model)}


__all__ = [
    "load", "LoadedModel", "Transformer", "ModelConfig", "GenerationConfig", "GenerationResult", "Timing",
    "FeatherError", "ConfigError", "CheckpointError", "DataError", "GenerationError", "__version__",
]
