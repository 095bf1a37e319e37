"""The training loop: one flat function, read top to bottom.

    finetune(config) -> result
      read the data (all of it, before any file is written: a bad row leaves no half-made run)
      build the model: base weights, task head, PEFT method
      AdamW with decay groups, warmup then linear/cosine decay
      for each step: accumulate micro-batches, clip, step
                     log, evaluate, keep the best checkpoint, early stopping, checkpoint `last`
      plot, return the summary

Resume: the data order is a pure function of (seed, epoch), so the step count says where the run
stands; optimizer moments, RNG state and the loop's counters come from ``last/``. A resumed run
ends with the same weights and the same metrics.jsonl lines as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute
from tqdm.auto import tqdm

from featherlm.data import batch_order
from featherlm.errors import ConfigError
from featherlm.io import atomic_write_text
from featherlm.model.layers import Block
from featherlm.peft import count_parameters
from featherlm.train import parallel
from featherlm.train.config import FinetuneConfig, load_config, save_config
from featherlm.train.plot import plot_curves
from featherlm.train.run import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    PLOT,
    TrainerState,
    append_metrics,
    base_checkpoint,
    build_for_run,
    prepare_run_dir,
    read_metrics,
    restore_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from featherlm.train.tasks import Task, TaskData, autocast

TIMING_KEYS = ("time_s", "examples_per_s")  # metrics.jsonl fields that vary from run to run


def finetune(config: FinetuneConfig | Mapping[str, Any] | str | Path, *,
             overrides: Sequence[str] | Mapping[str, Any] = (), resume: bool = False,
             stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune a model as ``config`` (a FinetuneConfig, a dict, or a YAML path) says.

    ``overrides``: dotted CLI-style settings on top (``["--train.lr", "5e-4"]``). ``resume``:
    continue the run in ``out.dir`` from its ``last`` checkpoint. ``stop_after``: stop once this
    many steps are done, checkpointing ``last`` (for time-sliced jobs; resume continues it; the
    schedule is unchanged). Ctrl-C does the same at the end of the current step. ``progress``:
    the progress bar and messages. Returns a summary (see the end of this function).
    """
    cfg = load_config(config, overrides)
    t, task = cfg.train, cfg.task
    rank, world = parallel.init()  # (0, 1) unless launched by torchrun
    main = rank == 0  # only the first process prints and writes
    progress = progress and main
    say = functools.partial(print, file=sys.stderr) if progress else (lambda *a, **k: None)
    run_dir = Path(cfg.out.dir)

    # ---- data and model; nothing is written until all data has been read
    checkpoint = base_checkpoint(cfg)  # the named model, or a new one for model.name scratch:FAMILY
    tokenizer = checkpoint.tokenizer
    if tokenizer is None:
        raise ConfigError(f"{cfg.model.name}: the model has no tokenizer; fine-tuning reads text")
    train_data, eval_data, skipped = read_data(cfg, task, tokenizer)
    for split, rows in skipped.items():
        if rows:
            line, reason = rows[0]
            say(f"{split}: skipped {len(rows)} bad rows (first: line {line}: {reason})")
    model, _ = build_for_run(cfg, checkpoint)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%), "
        f"method {cfg.peft.method}")

    # ---- optimizer and schedule; then the run dir (after every check that can fail)
    names, optimizer = make_optimizer(model, cfg)
    if main:
        prepare_run_dir(run_dir, cfg, resume)  # an error here ends every process (torchrun stops the group)
    parallel.barrier()
    params = [p for p in model.parameters() if p.requires_grad]
    batches_per_epoch = math.ceil(len(train_data) / t.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    warmup = round(t.warmup_ratio * total_steps)
    state = TrainerState(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    if resume:
        state = restore_checkpoint(run_dir / LAST, model, optimizer, names)
        if (state.steps_per_epoch, state.total_steps) != (steps_per_epoch, total_steps):
            raise ConfigError(f"cannot resume {run_dir}: the data gives {steps_per_epoch} steps per epoch "
                              f"({total_steps} in all), the checkpoint was made with {state.steps_per_epoch} "
                              f"({state.total_steps})")
        if main:
            truncate_metrics(run_dir / METRICS, state.step)
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG, save_config(cfg))
        (run_dir / METRICS).touch()

    parallel.barrier()
    if world > 1:  # distinct dropout masks per process (the data shards already differ)
        torch.manual_seed(t.seed * 1_000_003 + 7919 * rank + state.step)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    lengths = [len(e["input_ids"]) for e in train_data.examples]
    eval_bs = t.eval_batch_size or 2 * t.batch_size
    metric, higher = cfg.metric, cfg.higher_is_better
    order_epoch, batches = -1, []
    started, seen = time.perf_counter(), 0
    stop_reason = "stop_after" if stop_after is not None and stop_after <= state.step < total_steps else None

    model.train()
    bar = tqdm(total=total_steps, initial=state.step, disable=not progress, desc="finetune", unit="step",
               dynamic_ncols=True)
    with interruptible() as interrupt:
        while state.step < total_steps and not state.stopped_early and stop_reason is None:
            # ---- one optimizer step over grad_accum micro-batches
            epoch, k = divmod(state.step, steps_per_epoch)
            if epoch != order_epoch:  # the epoch's batches: seeded by (seed, epoch), see batch_order
                batches = batch_order(lengths, t.batch_size, seed=t.seed, epoch=epoch,
                                      bucket=cfg.data.bucket_by_length)
                order_epoch = epoch
            step_batches = batches[k * t.grad_accum:(k + 1) * t.grad_accum]
            # this process's share of each micro-batch: examples rank, rank + world, ... (all of it when alone)
            micro = [task.collate([train_data.examples[i] for i in b[rank::world]], pad_id)
                     for b in step_batches if b[rank::world]]
            lr = t.lr * lr_factor(state.step, total_steps, warmup, t.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # divide every micro-batch's summed loss by the whole step's count: the same gradient as
            # one big batch, whatever the split (and the token count of each micro-batch)
            terms = round(parallel.sum_scalar(sum(task.terms(b) for b in micro)))  # of the global batch
            step_loss = 0.0
            for batch in micro:
                with autocast(t.bf16):
                    loss, _ = task.loss(model, batch)
                (loss / max(terms, 1)).backward()
                step_loss += float(loss.detach())
            parallel.sum_gradients(params)  # the whole batch's gradient on every process
            step_loss = parallel.sum_scalar(step_loss)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            seen += sum(len(b) for b in step_batches)
            state.window_loss += step_loss / max(terms, 1)
            state.window_steps += 1
            bar.update(1)

            # ---- logging
            elapsed = time.perf_counter() - started
            if state.step % t.log_every == 0 or state.step == total_steps:
                record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "split": "train",
                          "loss": state.window_loss / state.window_steps, "lr": lr, "grad_norm": grad_norm,
                          "time_s": round(elapsed, 3), "examples_per_s": round(seen / max(elapsed, 1e-9), 2)}
                if main:
                    append_metrics(run_dir / METRICS, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                state.window_loss, state.window_steps = 0.0, 0

            # ---- evaluation, best checkpoint, early stopping, `last` checkpoint
            due = state.step == total_steps or (state.step % t.eval_every == 0 if t.eval_every
                                                else state.step % steps_per_epoch == 0)
            if due and eval_data is not None and main:
                result = task.evaluate(model, eval_data, cfg=cfg, tokenizer=tokenizer, batch_size=eval_bs,
                                       pad_id=pad_id, bf16=t.bf16)
                result.pop("predictions", None)
                value = result[metric]
                best = state.best_value
                improved = best is None or (value > best if higher else value < best)
                if improved:
                    state.best_value, state.best_step, state.bad_evals = value, state.step, 0
                    save_checkpoint(run_dir / BEST, model, cfg.peft, eval_metrics={"step": state.step, **result})
                else:
                    state.bad_evals += 1
                    if t.early_stopping_patience and state.bad_evals >= t.early_stopping_patience:
                        state.stopped_early, stop_reason = True, "early_stopping"
                append_metrics(run_dir / METRICS, {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                                                   "split": "eval", **result, "best": improved,
                                                   "time_s": round(time.perf_counter() - started, 3)})
                if progress:
                    bar.write(f"step {state.step}: eval {metric} {value:.4f}" + (" (best)" if improved else ""),
                              file=sys.stderr)
            if stop_after is not None and stop_after <= state.step < total_steps:
                stop_reason = "stop_after"
            elif interrupt["requested"]:
                stop_reason = "interrupted"
            if world > 1:  # rank 0 evaluated: every process follows its early-stopping decision
                early, = parallel.broadcast_flags(int(state.stopped_early))
                if early and not state.stopped_early:
                    state.stopped_early, stop_reason = True, "early_stopping"
            if (due or stop_reason) and main:
                save_checkpoint(run_dir / LAST, model, cfg.peft, state=state, optimizer=optimizer, names=names)
    bar.close()
    parallel.barrier()  # rank 0's last writes are done before any process reads the run dir

    # ---- summary
    records = read_metrics(run_dir / METRICS)
    if cfg.out.plot and main:
        plot_curves(records, run_dir / PLOT, metric)
    evals = [r for r in records if r.get("split") == "eval"]
    trains = [r for r in records if r.get("split") == "train"]
    summary = {
        "run_dir": str(run_dir), "task": task.name, "method": cfg.peft.method, "metric": metric,
        "step": state.step, "total_steps": total_steps, "epoch": round(state.step / steps_per_epoch, 4),
        "finished": state.step >= total_steps or state.stopped_early, "stopped": stop_reason,
        "best_step": state.best_step, "best_value": state.best_value,
        "train_loss": trains[-1]["loss"] if trains else None,
        "eval": evals[-1] if evals else None,
        "trainable_params": trainable, "total_params": total,
        "train_examples": len(train_data), "eval_examples": len(eval_data) if eval_data else 0,
        "skipped_rows": {split: len(rows) for split, rows in skipped.items()},
        "time_s": round(time.perf_counter() - started, 3),
    }
    if stop_reason in ("stop_after", "interrupted"):
        say(f"stopped at step {state.step} of {total_steps}; continue with resume=True (--resume)")
    return summary


# ----------------------------------------------------------------------------- helpers of the loop


def read_data(cfg: FinetuneConfig, task: Task, tokenizer) -> tuple[TaskData, TaskData | None, dict[str, list]]:
    """(train data, eval data or None, skipped rows per split); the training file is read first, so a
    task can learn from it what the evaluation data is read against (classification: the labels)."""
    d = cfg.data
    skipped: dict[str, list] = {}
    out: list[TaskData | None] = []
    for split, path, limit in (("train", d.train, d.max_train_examples), ("eval", d.eval, d.max_eval_examples)):
        if not path:
            out.append(None)
            continue
        data = task.read(cfg, path, tokenizer, skip_bad_rows=d.skip_bad_rows)
        skipped[split] = data.skipped
        if split == "train" and d.eval_ratio > 0:  # hold out part of the training file (before any subset)
            if len(data) < 2:
                raise ConfigError(f"{path}: data.eval_ratio needs at least 2 examples, got {len(data)}")
            data, held = task.split(data, d.eval_ratio, cfg.train.seed)
            out.append(task.subset(data, limit, cfg.train.seed))
            out.append(task.subset(held, d.max_eval_examples, cfg.train.seed))
            break
        out.append(task.subset(data, limit, cfg.train.seed))
    return out[0], out[1], skipped


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> tuple[list[str], torch.optim.Optimizer]:
    """(names of the trainable parameters in optimizer order, optimizer).

    Weight decay only on matrices: decaying biases and norm gains towards 0 just fights the
    model's own scale, as BERT's and GPT's recipes note.
    """
    t = cfg.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError(f"peft method {cfg.peft.method!r} left no trainable parameter")
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    groups = [{"params": [p for _, p in decay], "weight_decay": t.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
    else:
        kind = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        optimizer = kind(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8)
    return [n for n, _ in decay] + [n for n, _ in no_decay], optimizer


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for update ``step`` (0-based): linear warmup, then the decay.

    Warmup reaches the peak on its last step; the decay never reaches 0 within the run, so no
    update is wasted at lr 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward instead of storing its activations.

    Done by giving each Block instance a ``forward`` that runs the class's forward under
    ``torch.utils.checkpoint``: parameter names and the model code stay as they are.
    """
    for module in model.modules():
        if isinstance(module, Block):
            inner = Block.forward.__get__(module)
            module.forward = functools.partial(recompute, inner, use_reentrant=False)


@contextmanager
def interruptible() -> Iterator[dict[str, bool]]:
    """While training, the first Ctrl-C asks for a stop at the end of the step (with a checkpoint);
    a second one interrupts at once. Only the main thread can own signal handlers."""
    flag = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["requested"]:
            raise KeyboardInterrupt
        flag["requested"] = True
        print("\nstopping after this step, with a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
