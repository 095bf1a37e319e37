"""Model files in and out: Hugging Face folders, GGUF files and featherlm's own folders.

``read_checkpoint`` turns any supported path into a ModelConfig plus a state dict in featherlm's
names; ``save_model`` writes featherlm's folder and ``export_hf`` a folder ``transformers`` loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from featherlm.checkpoint.hf import (
    config_from_hf,
    config_to_hf,
    featherlm_to_hf,
    hf_to_featherlm,
    read_json,
    read_safetensors,
    read_weights,
)
from featherlm.config import ModelConfig
from featherlm.errors import CheckpointError, ConfigError
from featherlm.io import atomic_dir

FEATHERLM_CONFIG = "featherlm.json"  # marks featherlm's own folder (config.json is HF's)


@dataclass
class Checkpoint:
    """A model read from disk, before it becomes a module."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    files: list[Path]
    kind: str  # "featherlm", "hf" or "gguf"
    tokenizer: Any = None  # featherlm.tokenizer.Tokenizer, or None when the files have none
    stored_as: str = ""  # how the weights are stored on disk: "float32", "bfloat16", GGUF "Q4_1"...


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a featherlm folder, an HF folder or a .gguf file; raise CheckpointError on anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(path, "expected a folder (config.json + *.safetensors) or a .gguf file")
        from featherlm.checkpoint.gguf import read_gguf

        g = read_gguf(path)
        config = config_from_hf(g.hf_config, where=str(path))
        state = hf_to_featherlm(g.state_dict, config, where=str(path))
        return Checkpoint(config, state, [path], "gguf", g.tokenizer, gguf_file_type(g.metadata))
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from featherlm.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    if (path / FEATHERLM_CONFIG).exists():
        try:
            config = ModelConfig.load(path / FEATHERLM_CONFIG)
        except ConfigError as e:
            raise CheckpointError(path / FEATHERLM_CONFIG, str(e)) from None
        state, files = read_weights(path)
        return Checkpoint(config, state, [path / FEATHERLM_CONFIG, *files], "featherlm", tokenizer, main_dtype(state))
    if not (path / "config.json").exists():
        raise CheckpointError(path, "folder has no config.json (nor featherlm.json): not a model folder")
    config = config_from_hf(read_json(path / "config.json"), where=str(path / "config.json"))
    state, files = read_weights(path)
    state = hf_to_featherlm(state, config, where=str(path))
    return Checkpoint(config, state, [path / "config.json", *files], "hf", tokenizer, main_dtype(state))


def main_dtype(state: dict[str, torch.Tensor]) -> str:
    """The dtype holding most of the parameters, e.g. "float32"."""
    counts: dict[str, int] = {}
    for t in state.values():
        name = str(t.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=counts.get) if counts else ""


def gguf_file_type(metadata: dict) -> str:
    """GGUF's ``general.file_type`` as llama.cpp names it ("Q4_1", "Q4_K_M", "F16"...)."""
    import gguf

    value = metadata.get("general.file_type")
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {value}" if value is not None else ""


def build_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Instantiate the Transformer of a checkpoint and load its weights strictly."""
    from featherlm.model import Transformer

    with torch.device("meta"):
        model = Transformer(checkpoint.config)
    model = model.to_empty(device=device)
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True, assign=False)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(checkpoint.files[0], "weights do not match the config: " + " ".join(first)) from None
    model.init_buffers()
    return model.to(dtype).eval()


def save_model(model, tokenizer, folder: str | Path) -> Path:
    """Write featherlm's folder: featherlm.json + model.safetensors (+ tokenizer files), atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / FEATHERLM_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        save_file(owned_tensors(model.state_dict()), str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "producer": "featherlm"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder


def owned_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached tensors that each own their memory: safetensors refuses tensors that share a buffer
    (a weight that is a slice of a bigger tensor, as after some user edits or conversions)."""
    out = {}
    for name, t in state.items():
        t = t.detach()
        shared = t.untyped_storage().nbytes() != t.numel() * t.element_size()
        out[name] = t.clone() if shared or not t.is_contiguous() else t
    return out


def export_hf(model, tokenizer, folder: str | Path) -> Path:
    """Write a Hugging Face folder (config.json + model.safetensors + tokenizer) that transformers loads."""
    folder = Path(folder)
    state = owned_tensors(featherlm_to_hf(model.state_dict(), model.config))
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder


__all__ = ["Checkpoint", "read_checkpoint", "build_model", "save_model", "export_hf", "read_safetensors"]
