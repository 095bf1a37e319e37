"""Partial fine-tuning: some transformer blocks train, the rest stays frozen.

``config.freeze`` says what trains: "top:K" the last K blocks (the classic choice: upper layers are
the most task-specific), "bottom:K" the first K, "layers:0,5" the listed blocks, "head" no block
(only ``modules_to_save``, e.g. a classifier: linear probing). Embeddings, the final norm and the
LM head train only when named in ``modules_to_save``.
"""

from __future__ import annotations

from torch import nn

from featherlm.errors import ConfigError
from featherlm.peft.base import PeftConfig, backbone

FORMS = '"top:K", "bottom:K", "layers:I,J,..." or "head"'


def trained_blocks(spec: str, n_layer: int) -> list[int]:
    """Block indices that train for a freeze spec; a ConfigError naming the valid forms otherwise."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "head" and not arg:
            return []
        if kind in ("top", "bottom"):
            k = int(arg)
            if not 1 <= k <= n_layer:
                raise ConfigError(f"peft.freeze {spec!r}: K must be in 1..{n_layer} (the model has {n_layer} blocks)")
            return list(range(n_layer - k, n_layer)) if kind == "top" else list(range(k))
        if kind == "layers":
            blocks = sorted({int(i) for i in arg.split(",")})
            if not blocks or not all(0 <= i < n_layer for i in blocks):
                raise ConfigError(f"peft.freeze {spec!r}: block numbers must be in 0..{n_layer - 1}")
            return blocks
    except ValueError:
        pass
    raise ConfigError(f"peft.freeze {spec!r} is not one of {FORMS}")


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    _, transformer = backbone(model)
    for i in trained_blocks(config.freeze, len(transformer.layers)):
        transformer.layers[i].requires_grad_(True)
