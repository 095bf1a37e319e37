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
            "vocab_size": c.vocab_size, "context_length": c.max_seq_len, "parameters": self.model.num_params(),
            "dtype": str(self.model.embed_tokens.weight.dtype).replace("torch.", ""), "stored_as": self.stored_as,
            "tokenizer_vocab_size": getattr(self.tokenizer, "vocab_size", None),
            "files": [str(f) for f in self.files],
        }


def load(name: str | Path, *, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """Load a model by embedded name, local HF/featherlm folder, .gguf file or hub id."""
    from featherlm.checkpoint import build_model, read_checkpoint
    from featherlm.hub import resolve

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    checkpoint = read_checkpoint(resolve(name))
    model = build_model(checkpoint, dtype=dtype, device=device)
    return LoadedModel(model, checkpoint.tokenizer, str(name), checkpoint.files, checkpoint.kind,
                       checkpoint.stored_as)


__all__ = [
    "load", "LoadedModel", "Transformer", "ModelConfig", "GenerationConfig", "GenerationResult", "Timing",
    "FeatherError", "ConfigError", "CheckpointError", "DataError", "GenerationError", "__version__",
]
