"""LoRA and DoRA adapters in Hugging Face PEFT's file format, both ways.

PEFT names a tensor by the module path of the HF model plus a suffix, under ``base_model.model.``:
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` for a LlamaForCausalLM;
``...lora_B.weight`` and DoRA's ``...lora_magnitude_vector``; a module in ``modules_to_save`` keeps its
plain parameter name (``base_model.model.lm_head.weight``). Module paths go through the family's name
map in ``featherlm.checkpoint.hf``, so the file loads with ``PeftModel.from_pretrained`` on the HF
model that ``export_hf`` writes (Llama and BERT; GPT-2 fuses q/k/v, so its adapters stay in
featherlm's format).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featherlm.checkpoint.hf import featherlm_to_hf, hf_to_featherlm
from featherlm.config import ModelConfig
from featherlm.errors import CheckpointError, FeatherError
from featherlm.peft.base import AdaptedLinear, PeftConfig, matches

PEFT_PREFIX = "base_model.model."
SUFFIXES = {"adapter_A": "lora_A.weight", "adapter_B": "lora_B.weight", "adapter_magnitude": "lora_magnitude_vector"}
TASK = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}  # the HF model featherlm_to_hf names describe
# PEFT config fields featherlm cannot honour, with the value that means "not used"
UNSUPPORTED = {"bias": "none", "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
               "fan_in_fan_out": False, "use_qalora": False}


def hf_name(name: str, cfg: ModelConfig) -> str | None:
    """featherlm parameter name (backbone-relative) -> HF parameter name; None when there is none."""
    try:
        (out,) = featherlm_to_hf({name: torch.empty(0)}, cfg)  # the name map wants a tensor; only names matter
    except (KeyError, ValueError):
        return None
    return out


def hf_module(module: str, cfg: ModelConfig) -> str | None:
    """featherlm module path -> HF module path (via its weight's name); None when there is none."""
    name = hf_name(module + ".weight", cfg)
    return None if name is None else name.removesuffix(".weight")


def target_list(modules: list[str], model: nn.Module, prefix: str, rename=lambda m: m) -> list[str]:
    """PEFT's target_modules for ``modules`` (backbone-relative, named by ``rename``): their short
    last parts ("q_proj", "query") when those select exactly these among the linear layers, else
    their full paths (say, only some layers)."""
    linears = [n[len(prefix):] for n, m in model.named_modules()
               if n.startswith(prefix) and isinstance(m, (nn.Linear, AdaptedLinear))]
    short = sorted({rename(m).rsplit(".", 1)[-1] for m in modules})
    chosen = {n for n in linears if rename(n) is not None and matches(rename(n), short)}
    return short if chosen == set(modules) else sorted(rename(m) for m in modules)


def to_peft(state: dict[str, Tensor], config: PeftConfig, model: nn.Module, prefix: str,
            cfg: ModelConfig) -> tuple[dict, dict[str, Tensor]] | None:
    """(adapter_config.json dict, tensors) in PEFT's format, or None when a name has no HF equivalent."""
    if config.method not in ("lora", "dora") or cfg.family not in TASK:
        return None
    tensors, modules = {}, set()
    for name, tensor in state.items():
        if not name.startswith(prefix):
            return None
        module, _, param = name[len(prefix):].rpartition(".")
        if param in SUFFIXES:
            hf = hf_module(module, cfg)
            modules.add(module)
            name_out = None if hf is None else hf + "." + SUFFIXES[param]
        else:  # modules_to_save: the plain parameter
            name_out = hf_name(module + "." + param, cfg)
        if name_out is None:
            return None
        tensors[PEFT_PREFIX + name_out] = tensor.detach().contiguous()
    targets = target_list(sorted(modules), model, prefix, lambda m: hf_module(m, cfg))
    saved = sorted({hf_module(m, cfg) for m in config.modules_to_save if hf_module(m, cfg)})
    data = {
        "peft_type": "LORA", "task_type": TASK[cfg.family], "base_model_name_or_path": config.base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": targets,
        "use_rslora": config.rslora, "use_dora": config.method == "dora", "bias": "none",
        "modules_to_save": saved or None, "inference_mode": True, "init_lora_weights": True,
    }
    return data, tensors


def from_peft(data: dict, tensors: dict[str, Tensor], model: nn.Module, prefix: str, cfg: ModelConfig,
              where: str) -> tuple[PeftConfig, dict[str, Tensor]]:
    """PeftConfig and featherlm-named tensors of a PEFT LoRA/DoRA adapter (CheckpointError if unusable)."""
    for key, unused in UNSUPPORTED.items():
        if data.get(key, unused) not in (unused, None, {}, False, "none"):
            raise CheckpointError(where, f"PEFT option {key}={data[key]!r} is not supported by featherlm")
    state, modules, saved = {}, set(), set()
    try:
        for name, tensor in tensors.items():
            if not name.startswith(PEFT_PREFIX):
                raise CheckpointError(where, f"unexpected tensor {name!r} (PEFT names start with {PEFT_PREFIX!r})")
            name = name[len(PEFT_PREFIX):]
            kind = next((k for k, s in SUFFIXES.items() if name.endswith("." + s)), None)
            if kind is None:  # a modules_to_save parameter
                (ours,) = hf_to_featherlm({name: tensor}, cfg, where=where)
                saved.add(ours.rpartition(".")[0])
                state[prefix + ours] = tensor
                continue
            hf_module = name[: -len(SUFFIXES[kind]) - 1]
            (ours,) = hf_to_featherlm({hf_module + ".weight": tensor}, cfg, where=where)
            module = ours.removesuffix(".weight")
            modules.add(module)
            state[f"{prefix}{module}.{kind}"] = tensor
    except ValueError:  # the name map dropped it (e.g. a tied lm_head)
        raise CheckpointError(where, "adapter holds weights this model does not have") from None
    if not modules:
        raise CheckpointError(where, "no LoRA weights (lora_A / lora_B) in the adapter file")
    try:
        config = PeftConfig(
            method="dora" if data.get("use_dora") else "lora", r=int(data["r"]),
            alpha=float(data.get("lora_alpha", 8)), dropout=float(data.get("lora_dropout") or 0.0),
            rslora=bool(data.get("use_rslora", False)), target_modules=target_list(sorted(modules), model, prefix),
            modules_to_save=sorted(saved), base_model=data.get("base_model_name_or_path"),
        )
    except (KeyError, TypeError, FeatherError) as e:
        raise CheckpointError(where, f"bad PEFT adapter config ({type(e).__name__}: {e})") from None
    return config, state
