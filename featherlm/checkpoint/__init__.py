"""Model files in and out: Hugging Face folders, GGUF files and featherlm's own folders.

``read_checkpoint`` turns any supported path into a ModelConfig plus a state dict in featherlm's
names; ``save_model`` writes featherlm's folder and ``export_hf`` a folder ``transformers`` loads.
``scratch_checkpoint`` makes a new, randomly initialised model of a family for a tokenizer (training
from scratch goes through the same ``build_model`` as a loaded one).

Tied parameters (T5's one embedding table, named ``encoder.embed_tokens`` and ``decoder.embed_tokens``)
are written once; ``build_model`` fills the other names from it.
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
    untie_t5,
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
    config = untie_t5(config, state)
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
    """Instantiate the model of a checkpoint (a Transformer, or a Seq2SeqTransformer for T5) and load
    its weights strictly."""
    from featherlm.model import new_model

    with torch.device("meta"):
        model = new_model(checkpoint.config)
    model = model.to_empty(device=device)
    state = dict(checkpoint.state_dict)
    for names in tied_names(model):  # a tied parameter is stored once: the other names read the same tensor
        present = [n for n in names if n in state]
        for name in names:
            if present and name not in state:
                state[name] = state[present[0]]
    try:
        model.load_state_dict(state, strict=True, assign=False)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        where = checkpoint.files[0] if checkpoint.files else checkpoint.kind
        raise CheckpointError(where, "weights do not match the config: " + " ".join(first)) from None
    model.init_buffers()
    return model.to(dtype).eval()


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one parameter (T5: encoder and decoder embed_tokens)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied parameter under its first name only (safetensors refuses
    tensors that share memory, and one copy on disk is enough)."""
    state = model.state_dict()
    for names in tied_names(model):
        for name in names[1:]:
            state.pop(name, None)
    return state


def save_model(model, tokenizer, folder: str | Path) -> Path:
    """Write featherlm's folder: featherlm.json + model.safetensors (+ tokenizer files), atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / FEATHERLM_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        save_file(owned_tensors(untied_state(model)), str(tmp / "model.safetensors"),
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
    state = owned_tensors(featherlm_to_hf(untied_state(model), model.config))
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder


# ----------------------------------------------------------------------------- new models and tokenizers

# Named sizes of models trained from scratch (any ModelConfig field can still be overridden).
# "small" and "base" are T5's own widths; "tiny" trains in minutes on a CPU.
SCRATCH_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, d_model=64, d_ff=256),
    "mini": dict(n_layer=4, n_head=4, d_model=256, d_ff=1024),
    "small": dict(n_layer=6, n_head=8, d_model=512, d_ff=2048),
    "base": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072),
}


def scratch_checkpoint(family: str, tokenizer, *, size: str = "tiny", overrides: dict[str, Any] | None = None,
                       seed: int = 0, max_seq_len: int = 512) -> Checkpoint:
    """A randomly initialised model of ``family`` ("t5", "llama", "gpt2", "bert") sized for ``tokenizer``.

    The vocabulary size and the special ids (pad, bos, eos; T5 starts decoding from pad) come from the
    tokenizer; ``size`` names a row of SCRATCH_SIZES and ``overrides`` sets any ModelConfig field.
    Seeded, so a run rebuilt from its config (resume, load_run) starts from the same weights.
    """
    from featherlm.config import preset
    from featherlm.model import new_model

    if size not in SCRATCH_SIZES:
        raise ConfigError(f"unknown model size {size!r}; expected one of {', '.join(SCRATCH_SIZES)}")
    ids = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if family == "t5":
        if tokenizer.pad_id is None or tokenizer.eos_id is None:
            raise ConfigError(f"{tokenizer.source}: a T5 model needs a tokenizer with a pad and an end-of-sequence "
                              "token (the decoder starts from pad and stops at eos)")
        ids["decoder_start_token_id"] = tokenizer.pad_id
    vocab = max(tokenizer.vocab_size, 1 + max(tokenizer.backend.get_vocab(with_added_tokens=True).values()))
    fields = {**SCRATCH_SIZES[size], "vocab_size": vocab, "max_seq_len": max_seq_len,  # (ids may have gaps)
              **{k: v for k, v in ids.items() if v is not None}, **(overrides or {})}
    try:
        config = preset(family, **fields)
    except TypeError as e:  # an override that is not a ModelConfig field
        raise ConfigError(f"model overrides: {e}") from None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = new_model(config)
    return Checkpoint(config, owned_tensors(untied_state(model)), [], "scratch", tokenizer, "float32")


def read_tokenizer(path: str | Path):
    """The tokenizer of a model path: a folder's tokenizer.json, or a .gguf file's vocabulary."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from featherlm.checkpoint.gguf import read_gguf_tokenizer

        return read_gguf_tokenizer(path)
    if not path.is_dir():
        raise CheckpointError(path, "expected a tokenizer folder (tokenizer.json) or a .gguf file")
    from featherlm.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


__all__ = ["Checkpoint", "read_checkpoint", "build_model", "save_model", "export_hf", "read_safetensors",
           "scratch_checkpoint", "read_tokenizer", "SCRATCH_SIZES"]
