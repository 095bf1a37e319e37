"""Training: the fine-tuning config, the one training loop, and run directories.

    from featherlm.train import finetune
    result = finetune("examples/sst2-lora.yaml", overrides=["--train.lr", "5e-4"])
"""

from featherlm.train.config import FinetuneConfig, load_config, parse_overrides
from featherlm.train.run import load_run
from featherlm.train.trainer import finetune

__all__ = ["FinetuneConfig", "finetune", "load_config", "load_run", "parse_overrides"]
