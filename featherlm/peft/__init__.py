"""Parameter-efficient fine-tuning: one small file per method behind one interface.

A method is one function, ``apply(model, config, init_ids)``: it swaps targeted Linears for wrappers
that keep the base ``weight``/``bias`` names and add ``adapter_*`` parameters (lora, dora, ia3,
adapter, bitfit), sets one of the model's two generic hooks (prefix: ``Attention.kv_prefix``;
prompt: ``Transformer.embed_prefix``), or only unfreezes existing parameters (full, freeze, bitfit).
Everything else is written once, here: freezing, the adapter-only state dict, merging, adapter files,
and several named adapters on one base model. Typical use::

    apply(model, PeftConfig(method="lora", r=8))      # freezes the base, adds trainable adapters
    ...train...
    save_adapter(model, config, "out/adapter")          # adapter_config.json + adapter_model.safetensors
    load_adapter(fresh_base, "out/adapter")             # or load_adapter(model, folder, name="sst2")
    with using(model, "sst2"): model(ids)               # switch adapters per call

LoRA/DoRA files use Hugging Face PEFT's format (``peft`` loads them, and featherlm loads ``peft``'s);
the other methods use featherlm's own: ``{"featherlm_method": ..., "config": {...}}`` plus tensors
in featherlm's names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from featherlm.checkpoint.hf import read_json, read_safetensors
from featherlm.config import from_dict
from featherlm.errors import CheckpointError, ConfigError
from featherlm.io import atomic_dir
from featherlm.peft import adapter, bitfit, freeze, full, hf_format, ia3, lora, prefix, prompt
from featherlm.peft.base import AdaptedLinear, PeftConfig, backbone, matches

METHODS: dict[str, Callable[[nn.Module, PeftConfig, list[int] | None], None]] = {
    "full": full.apply,  # every parameter trains: the baseline
    "freeze": freeze.apply,  # some blocks train (config.freeze)
    "bitfit": bitfit.apply,  # biases only (Ben Zaken et al. 2022)
    "lora": lora.apply,  # low-rank update W + s B A (Hu et al. 2021); rsLoRA with config.rslora
    "dora": lora.apply,  # LoRA plus a learned magnitude per output row (Liu et al. 2024)
    "ia3": ia3.apply,  # learned rescaling of keys, values, FFN activation (Liu et al. 2022)
    "adapter": adapter.apply,  # Houlsby bottleneck after attention and MLP (Houlsby et al. 2019)
    "prefix": prefix.apply,  # trainable key/value prefixes in every layer (Li & Liang 2021)
    "prompt": prompt.apply,  # trainable virtual token embeddings (Lester et al. 2021)
}
HOOKS = ("kv_prefix", "embed_prefix")  # the model's hook attributes prompt-style methods set
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class PeftState:
    """What apply() records on the model (as ``model.peft_state``)."""

    config: PeftConfig | None  # the active adapter; None: the plain base model runs
    keys: list[str]  # parameter names the active adapter's file holds (what trained after apply)
    active: str | None = "default"
    stored: dict[str, tuple[PeftConfig, dict[str, Tensor]]] = field(default_factory=dict)  # inactive adapters


def _state(model: nn.Module) -> PeftState:
    st = getattr(model, "peft_state", None)
    if st is None or st.config is None:
        raise ConfigError("peft: the model has no active adapter (call featherlm.peft.apply first)")
    return st


# ----------------------------------------------------------------------------- apply and parameters


def apply(model: nn.Module, config: PeftConfig, *, init_ids: list[int] | None = None) -> nn.Module:
    """Attach ``config``'s method in place and freeze everything but its parameters and
    ``modules_to_save``; return the model. ``init_ids``: token ids of ``prompt_init_text`` (prompt)."""
    if config.method not in METHODS:
        close = difflib.get_close_matches(config.method, METHODS, n=1)
        raise ConfigError(f"peft: unknown method {config.method!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                                        f"; expected one of {', '.join(METHODS)}"))
    old = getattr(model, "peft_state", None)
    if old is not None and old.config is not None:
        raise ConfigError("peft: the model already has an adapter; use load_adapter(..., name=...) to add another")
    model.requires_grad_(False)
    METHODS[config.method](model, config, init_ids)
    saved = [m for name, m in model.named_modules() if name and matches(name, config.modules_to_save)]
    if config.modules_to_save and not saved:
        raise ConfigError(f"peft: modules_to_save {config.modules_to_save} match no module")
    for module in saved:
        module.requires_grad_(True)
    keys = [name for name, p in model.named_parameters() if p.requires_grad]
    if not keys:
        raise ConfigError(f"peft: method {config.method!r} leaves nothing to train on this model "
                          "(name a module in modules_to_save)")
    model.peft_state = PeftState(config, keys, stored=old.stored if old is not None else {})
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors an adapter file holds: the adapter's parameters and modules_to_save (detached)."""
    params = dict(model.named_parameters())
    return {k: params[k].detach() for k in _state(model).keys}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], *, where: str = "adapter weights") -> None:
    """Copy adapter tensors in; every adapter key must be there, and nothing else (CheckpointError)."""
    st = _state(model)
    missing, unexpected = sorted(set(st.keys) - set(state)), sorted(set(state) - set(st.keys))
    if missing or unexpected:
        raise CheckpointError(where, f"weights do not match the {st.config.method} adapter: "
                                     f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    params = dict(model.named_parameters())
    for key in st.keys:  # check all before copying any: a failed load leaves the model as it was
        if params[key].shape != state[key].shape:
            raise CheckpointError(where, f"{key} has shape {tuple(state[key].shape)}, the adapter "
                                         f"expects {tuple(params[key].shape)} (another r or model?)")
    unmerge_(model)
    with torch.no_grad():
        for key in st.keys:
            params[key].copy_(state[key])


# ----------------------------------------------------------------------------- merging and removal


def _wrappers(model: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def merge(model: nn.Module) -> nn.Module:
    """Replace every mergeable wrapper (LoRA, DoRA, IA3, BitFit's added bias) by a plain Linear with
    folded weights, in place; others (adapter, prefix, prompt) stay. Return the model."""
    for name, wrapper in _wrappers(model):
        if wrapper.mergeable:
            model.set_submodule(name, wrapper.merged())
    st = getattr(model, "peft_state", None)
    if st is not None:  # folded parameters are gone from the adapter
        params = dict(model.named_parameters())
        st.keys = [k for k in st.keys if k in params]
    return model


def merge_(model: nn.Module) -> None:
    """Fold every in-place mergeable wrapper's update into its weights (exactly undone by unmerge_)."""
    for _, wrapper in _wrappers(model):
        if wrapper.mergeable:
            wrapper.merge_()


def unmerge_(model: nn.Module) -> None:
    """Restore the exact base weights of every wrapper merged by merge_."""
    for _, wrapper in _wrappers(model):
        wrapper.unmerge_()


def remove(model: nn.Module) -> nn.Module:
    """Take the active adapter out: wrappers become the base Linears again, hooks are cleared.
    Parameters trained in place (full, freeze, bitfit, modules_to_save) keep their values."""
    for name, wrapper in _wrappers(model):
        model.set_submodule(name, wrapper.unwrapped())
    for module in model.modules():
        for hook in HOOKS:
            if getattr(module, hook, None) is not None:
                setattr(module, hook, None)
    st = getattr(model, "peft_state", None)
    if st is not None:
        st.config, st.keys, st.active = None, [], None
    return model


# ----------------------------------------------------------------------------- several adapters


def _activate(model: nn.Module, name: str, config: PeftConfig, state: dict[str, Tensor], where: str) -> None:
    """Make (config, state) the active adapter called ``name``; the active one is stored away first.
    Same config: the tensors are copied in (cheap enough per call); else re-applied."""
    st = getattr(model, "peft_state", None)
    if st is not None and st.config is not None:
        if st.active != name:
            st.stored[st.active] = (st.config, {k: v.clone() for k, v in adapter_state_dict(model).items()})
        if st.config != config:
            remove(model)
    if getattr(model, "peft_state", None) is None or model.peft_state.config is None:
        apply(model, config, init_ids=[0])  # the weights are loaded next: any prompt init will do
    load_adapter_state_dict(model, state, where=where)
    model.peft_state.active = name
    model.peft_state.stored.pop(name, None)


def set_active(model: nn.Module, name: str | None) -> None:
    """Switch to the adapter loaded as ``name``; None runs the base model (see ``remove``)."""
    st = getattr(model, "peft_state", None)
    if name == active_adapter(model):
        return
    if name is None:
        st.stored[st.active] = (st.config, {k: v.clone() for k, v in adapter_state_dict(model).items()})
        remove(model)
        return
    if st is None or name not in st.stored:
        raise ConfigError(f"peft: no adapter named {name!r}; loaded: {', '.join(adapter_names(model)) or 'none'}")
    config, state = st.stored[name]
    _activate(model, name, config, state, where=f"adapter {name!r}")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters loaded on the model, active or not."""
    st = getattr(model, "peft_state", None)
    if st is None:
        return []
    return sorted(set(st.stored) | ({st.active} if st.active else set()))


def active_adapter(model: nn.Module) -> str | None:
    st = getattr(model, "peft_state", None)
    return None if st is None else st.active


@contextmanager
def using(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """``with using(model, "sst2"): ...`` runs with that adapter, then switches back."""
    before = active_adapter(model)
    set_active(model, name)
    try:
        yield model
    finally:
        set_active(model, before)


# ----------------------------------------------------------------------------- files


def save_adapter(model: nn.Module, config: PeftConfig | None, folder: str | Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically (PEFT's format for LoRA/DoRA
    on Llama and BERT, featherlm's otherwise). ``config`` None: the model's active adapter's config."""
    config = config or _state(model).config
    state = adapter_state_dict(model)
    prefix_, transformer = backbone(model)
    peft_files = hf_format.to_peft(state, config, model, prefix_, transformer.config)
    if peft_files is None:
        data = {"featherlm_method": config.method, "config": dataclasses.asdict(config)}
        tensors = {k: v.contiguous() for k, v in state.items()}
    else:
        data, tensors = peft_files
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "featherlm"})


def read_adapter(model: nn.Module, folder: str | Path) -> tuple[PeftConfig, dict[str, Tensor]]:
    """(config, featherlm-named tensors) of an adapter folder of either format; CheckpointError if unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "no such adapter folder")
    data = read_json(folder / CONFIG_FILE)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    if not isinstance(data, dict):
        raise CheckpointError(folder / CONFIG_FILE, "expected a JSON object")
    if "featherlm_method" in data:
        try:
            return from_dict(PeftConfig, data.get("config", {}), where=str(folder / CONFIG_FILE)), tensors
        except ConfigError as e:
            raise CheckpointError(folder / CONFIG_FILE, str(e)) from None
    if data.get("peft_type") != "LORA":
        raise CheckpointError(folder / CONFIG_FILE, f"unsupported adapter type {data.get('peft_type')!r} "
                                                    "(featherlm reads PEFT LoRA/DoRA and its own adapters)")
    prefix_, transformer = backbone(model)
    return hf_format.from_peft(data, tensors, model, prefix_, transformer.config, where=str(folder))


def load_adapter(model: nn.Module, folder: str | Path, *, name: str = "default") -> PeftConfig:
    """Read an adapter folder, attach it to the base ``model`` as ``name`` and make it active (any
    adapter active before is kept, see set_active). Returns its config."""
    config, state = read_adapter(model, folder)
    _activate(model, name, config, state, where=str(Path(folder) / WEIGHTS_FILE))
    return config


__all__ = ["METHODS", "PeftConfig", "PeftState", "AdaptedLinear", "apply", "count_parameters", "adapter_state_dict",
           "load_adapter_state_dict", "merge", "merge_", "unmerge_", "remove", "set_active", "active_adapter",
           "adapter_names",
           "using", "save_adapter", "read_adapter", "load_adapter"]
