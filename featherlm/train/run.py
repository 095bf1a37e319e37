"""A run directory: its layout, its checkpoints, and loading a trained model back.

    run/
      config.yaml        the resolved config (label names included); `load_config` reads it back
      metrics.jsonl      one JSON object per training-log or evaluation line
      curves.png         loss and metric against steps
      last/              adapter/ + trainer_state.{json,safetensors}: what `resume` continues from
      best/              adapter/ + eval.json: the best evaluation so far

Every checkpoint folder is written with ``atomic_dir``: a crash leaves the previous one whole.
Trainer state is safetensors (optimizer moments by parameter name, RNG state) plus JSON (step,
early-stopping state, log window): nothing is pickled, so a run dir is safe to load from anyone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from featherlm.checkpoint import Checkpoint, build_model, read_checkpoint, read_tokenizer, scratch_checkpoint
from featherlm.errors import CheckpointError, ConfigError
from featherlm.hub import resolve
from featherlm.io import atomic_dir, atomic_write_text
from featherlm.peft import PeftConfig, apply, load_adapter_state_dict, read_adapter, save_adapter
from featherlm.train.config import SCRATCH, FinetuneConfig, load_config

CONFIG, METRICS, PLOT, LAST, BEST = "config.yaml", "metrics.jsonl", "curves.png", "last", "best"
STATE_JSON, STATE_TENSORS, ADAPTER = "trainer_state.json", "trainer_state.safetensors", "adapter"
RUN_FILES = (CONFIG, METRICS, PLOT, LAST, BEST)


@dataclass
class TrainerState:
    """The loop's counters; with the optimizer and RNG state this is everything `resume` needs.

    The data order is a pure function of (seed, epoch), so ``step`` alone says where in it the
    run stands; ``steps_per_epoch`` is kept to refuse resuming onto different data.
    """

    step: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    window_loss: float = 0.0  # training loss summed since the last log line, so a resumed run logs
    window_steps: int = 0  # the same averages as an uninterrupted one
    stopped_early: bool = False


def prepare_run_dir(run_dir: Path, config: FinetuneConfig, resume: bool) -> None:
    """Check the run dir fits the request before any file is written; clear it when overwriting."""
    if resume:
        if not (run_dir / LAST / STATE_JSON).is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no {LAST}/ checkpoint)")
        saved, now = load_config(run_dir / CONFIG).to_dict(), config.to_dict()
        del saved["out"], now["out"]  # where the run lives and whether to plot change nothing learnt
        diff = sorted(f"{s}.{k}" for s in saved for k in saved[s] if saved[s][k] != now.get(s, {}).get(k))
        if diff:
            raise ConfigError(f"cannot resume {run_dir}: the config differs in {', '.join(diff)}")
        return
    if run_dir.exists() and any((run_dir / name).exists() for name in RUN_FILES):
        if not config.out.overwrite:
            raise ConfigError(f"{run_dir} already holds a run: resume it, choose another out.dir, "
                              "or set out.overwrite")
        for name in RUN_FILES:  # only what a run writes: never anything else the user keeps there
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- checkpoints


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's per-parameter state keyed by parameter name (not by position, which a
    changed model would silently shuffle): tensors for safetensors, other values for JSON."""
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{names[index]}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{names[index]}.{key}"] = value
    return tensors, scalars


def save_checkpoint(folder: Path, model: nn.Module, peft: PeftConfig, *, state: TrainerState | None = None,
                    optimizer: torch.optim.Optimizer | None = None, names: list[str] | None = None,
                    eval_metrics: dict | None = None) -> None:
    """Write ``folder`` atomically: the adapter, plus trainer state or the evaluation that made it best."""
    with atomic_dir(folder) as tmp:
        save_adapter(model, peft, tmp / ADAPTER)
        if state is not None:
            tensors, scalars = optimizer_tensors(optimizer, names)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"producer": "featherlm"})
            data = {**asdict(state), "optimizer_scalars": scalars}
            (tmp / STATE_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        if eval_metrics is not None:
            (tmp / "eval.json").write_text(json.dumps(eval_metrics, indent=2) + "\n", encoding="utf-8")


def load_weights(model: nn.Module, folder: Path) -> None:
    """Copy an adapter's tensors into the parameters ``apply`` made. Copying in place (rather than
    ``load_adapter``, which may re-apply the method) keeps the optimizer's parameters the model's."""
    _, tensors = read_adapter(model, folder)
    load_adapter_state_dict(model, tensors, where=str(folder))


def restore_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       names: list[str]) -> TrainerState:
    """Load adapter, optimizer moments and RNG state from a ``last`` checkpoint; return its counters."""
    load_weights(model, folder / ADAPTER)
    try:
        data = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise CheckpointError(folder, f"unreadable trainer state ({e})") from None
    index = {name: i for i, name in enumerate(names)}
    per_param: dict[int, dict[str, Any]] = {}
    items = [(k[len("optimizer."):], v) for k, v in tensors.items() if k.startswith("optimizer.")]
    for key, value in [*items, *data.pop("optimizer_scalars", {}).items()]:
        name, field_name = key.rsplit(".", 1)
        if name not in index:
            raise CheckpointError(folder, f"optimizer state for {name!r}, which is not a trainable parameter")
        per_param.setdefault(index[name], {})[field_name] = value
    state_dict = optimizer.state_dict()
    state_dict["state"] = per_param
    optimizer.load_state_dict(state_dict)
    torch.set_rng_state(tensors["rng.torch"])
    return TrainerState(**data)


# ----------------------------------------------------------------------------- metrics log


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- loading a run back


def base_checkpoint(config: FinetuneConfig) -> Checkpoint:
    """The model a run starts from: ``model.name`` read from disk, or with ``scratch:FAMILY`` a new one
    sized by ``model.size`` / ``model.overrides`` for ``model.tokenizer`` (seeded by ``train.seed``)."""
    m = config.model
    if not m.name.startswith(SCRATCH):
        return read_checkpoint(resolve(m.name))
    overrides = {"max_seq_len": max(512, config.train.max_seq_len), **m.overrides}
    return scratch_checkpoint(m.name[len(SCRATCH):], read_tokenizer(resolve(m.tokenizer)), size=m.size,
                              overrides=overrides, seed=config.train.seed)


def build_for_run(config: FinetuneConfig, checkpoint=None) -> tuple[nn.Module, Any]:
    """The model a run trains (base weights, task head, PEFT applied) and the tokenizer.

    Seeded, so the head and the adapter start the same way in a fresh run and in a resumed one
    (whose weights are then replaced by the checkpoint's anyway).
    """
    checkpoint = checkpoint or base_checkpoint(config)
    if checkpoint.tokenizer is None:
        raise CheckpointError(config.model.name, "the model has no tokenizer; fine-tuning reads text")
    torch.manual_seed(config.train.seed)
    model = config.task.build_model(build_model(checkpoint), config)
    tok, text = checkpoint.tokenizer, config.peft.prompt_init_text
    apply(model, config.peft, init_ids=tok.encode(text, add_special_tokens=False) if text else None)
    return model, tok


def load_run(run_dir: str | Path, checkpoint: str = BEST) -> tuple[nn.Module, Any, FinetuneConfig]:
    """(model in eval mode, tokenizer, resolved config) of a fine-tuning run; ``checkpoint`` is
    "best" (falls back to "last" when the run had no evaluation data) or "last"."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(run_dir, f"not a fine-tuning run (no {CONFIG})")
    config = load_config(run_dir / CONFIG)
    folder = run_dir / checkpoint
    if checkpoint == BEST and not folder.is_dir():
        folder = run_dir / LAST
    if not (folder / ADAPTER).exists():
        raise CheckpointError(folder, "no adapter in this checkpoint folder")
    model, tokenizer = build_for_run(config)
    load_weights(model, folder / ADAPTER)
    return model.eval(), tokenizer, config
