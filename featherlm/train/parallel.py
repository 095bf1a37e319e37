"""Data parallelism for the fine-tuning loop under ``torchrun`` (gloo on CPU, nccl on GPU).

Each process reads all the data and computes the same batch order; of every micro-batch, rank r
takes examples ``r, r + world, ...``. Gradients are summed across processes (``all_reduce``) after
each loss was divided by the *global* number of loss terms, so the update is exactly the one a
single process computes on the whole batch. PEFT trains few parameters, so reducing them by hand
costs little and keeps the model a plain module (no DDP wrapper that renames parameters).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size): starts the process group when launched by torchrun, (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def sum_scalar(value: float) -> float:
    """``value`` summed over all processes (itself when alone)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def broadcast_flags(*flags: int) -> list[int]:
    """Rank 0's flags on every process: decisions only rank 0 makes (early stopping) stay in step."""
    if not active():
        return list(flags)
    t = torch.tensor(flags, dtype=torch.long)
    dist.broadcast(t, src=0)
    return t.tolist()


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over the processes (a rank without examples adds zeros)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
