"""What every PEFT method shares: the config, the Linear wrapper base class, finding targets.

Kept apart from ``featherlm/peft/__init__.py`` only so that the method files can import it while
``__init__`` imports the method files (for the registry) without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from featherlm.errors import ConfigError
from featherlm.model import Transformer
from featherlm.model.layers import Linear

# Where each method attaches when target_modules is not given (featherlm names = HF Llama names).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "lora": ["q_proj", "v_proj"],  # the LoRA paper's choice and HF PEFT's Llama default
    "dora": ["q_proj", "v_proj"],
    "ia3": ["k_proj", "v_proj", "down_proj"],  # the (IA)^3 paper: keys, values and the FFN activation
    "adapter": ["o_proj", "down_proj"],  # Houlsby: after attention's and after the MLP's output projection
    # BitFit trains every existing bias; bias-free projections (Llama has none) get a zero-init one
    "bitfit": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class PeftConfig:
    """Which PEFT method to apply and its sizes. Fields a method does not use are ignored by it."""

    method: str = "lora"  # registry name: full, freeze, bitfit, lora, dora, ia3, adapter, prefix, prompt
    # module-name suffixes to wrap, matched on whole name parts ("q_proj" matches "layers.0.self_attn.q_proj");
    # None: the method's default from DEFAULT_TARGETS (lora/dora: q_proj, v_proj)
    target_modules: list[str] | None = None
    r: int = 8  # LoRA/DoRA rank
    alpha: float = 16.0  # LoRA/DoRA: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # LoRA/DoRA: dropout on the adapter's input
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023): large r keeps learning
    adapter_size: int = 64  # Houlsby bottleneck width
    num_virtual_tokens: int = 20  # prompt tuning: virtual tokens; prefix tuning: key/value prefix length
    prompt_init_text: str | None = None  # prompt tuning: start from this text's embeddings (pass its ids as init_ids)
    # freeze method, what trains: "top:K" last K blocks, "bottom:K" first K blocks, "layers:0,5" those
    # blocks, "head" nothing but modules_to_save (a linear probe)
    freeze: str = "top:2"
    modules_to_save: list[str] = field(default_factory=list)  # extra modules trained fully, saved with the adapter
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])  # IA3: scale these modules' input
    base_model: str | None = None  # recorded as base_model_name_or_path in the adapter file

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS.get(self.method, []))
        for name, value, low in (("r", self.r, 1), ("adapter_size", self.adapter_size, 1),
                                 ("num_virtual_tokens", self.num_virtual_tokens, 1)):
            if value < low:
                raise ConfigError(f"peft.{name} must be >= {low}, got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")


def matches(name: str, suffixes: list[str]) -> bool:
    """True when a module name ends with one of the suffixes on a dot boundary (HF PEFT's rule)."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def linear_targets(model: nn.Module, suffixes: list[str], method: str) -> list[tuple[str, nn.Linear]]:
    """The Linear modules named by ``suffixes``; a ConfigError when none match or one is not a Linear."""
    found = [(name, m) for name, m in model.named_modules() if name and matches(name, suffixes)]
    for name, m in found:
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"peft: {name} is a {type(m).__name__}; {method} wraps linear layers only")
    if not found:
        examples = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"peft: target_modules {suffixes} match no module; linear layers: {', '.join(examples)}")
    return found


def backbone(model: nn.Module) -> tuple[str, Transformer]:
    """(name prefix, Transformer) of the featherlm transformer inside ``model`` (itself, or a head's body)."""
    for name, m in model.named_modules():
        if isinstance(m, Transformer):
            return (name + "." if name else ""), m
    raise ConfigError(f"peft: no featherlm Transformer inside {type(model).__name__}")


class AdaptedLinear(nn.Module):
    """Base of the wrappers around a Linear.

    Holds the base layer's own ``weight`` and ``bias`` Parameters under their own names, so a base
    checkpoint still loads into the adapted model; subclasses add ``adapter_*`` parameters and write
    ``forward``. Where the adapter is linear in the weights, ``merged_weights`` gives the folded
    (weight, bias); ``merge_`` / ``unmerge_`` fold it in place and back, ``merged()`` returns a plain
    Linear. ``unmerge_`` restores a copy kept by ``merge_`` rather than subtracting the update:
    (W + dW) - dW is not W in floating point, and merging must round-trip exactly. The copy costs one
    weight per merged module, only while merged.
    """

    mergeable = True

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.is_merged = False  # forward skips the adapter while its update sits in weight/bias
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def new_param(self, tensor: torch.Tensor) -> nn.Parameter:
        """An adapter parameter on the base weight's device and dtype."""
        return nn.Parameter(tensor.to(device=self.weight.device, dtype=self.weight.dtype))

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its weights")

    @torch.no_grad()
    def merge_(self) -> None:
        if self.is_merged:
            return
        weight, bias = self.merged_weights()
        if (bias is None) != (self.bias is None):
            raise ConfigError(f"{type(self).__name__} adds a bias: use merge(model), not an in-place merge")
        self._unmerged = (self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self.is_merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        if not self.is_merged:
            return
        weight, bias = self._unmerged
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self._unmerged, self.is_merged = None, False

    def _plain(self, weight: nn.Parameter, bias: nn.Parameter | None) -> Linear:
        with torch.device("meta"):  # no throwaway random init
            layer = Linear(self.in_features, self.out_features, bias=bias is not None)
        layer.weight, layer.bias = weight, bias
        return layer

    def merged(self) -> Linear:
        """A plain Linear computing what this wrapper computes, with new, folded parameters."""
        with torch.no_grad():
            weight, bias = (self.weight, self.bias) if self.is_merged else self.merged_weights()
            grad = self.weight.requires_grad
            return self._plain(nn.Parameter(weight.detach().clone(), grad),
                               None if bias is None else nn.Parameter(bias.detach().clone(), grad))

    def unwrapped(self) -> Linear:
        """The base layer again, sharing this wrapper's weight and bias (unmerged first)."""
        self.unmerge_()
        return self._plain(self.weight, self.bias)
