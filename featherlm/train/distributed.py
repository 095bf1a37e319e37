"""Data parallelism for pretraining under ``torchrun``: DDP or FSDP2 (gloo on CPU, nccl on GPU).

Every process draws the same global batch from the same seeded generator and keeps its own rows,
so the data needs no sampler and a run can resume on a different number of processes. Losses are
divided by the *global* count of loss terms and multiplied by the world size, because DDP and
FSDP average gradients over processes: the update is then exactly the one a single process makes
on the whole batch. Checkpoints hold full (unsharded) state keyed by parameter name, written by
rank 0 and read by every rank, whatever the wrapping.

    dist = setup("auto")                     # (rank 0 of 1 on cpu) without torchrun
    model = wrap(model, dist, fsdp=False, blocks=model.backbone.layers)
    with gradient_sync(model, last_micro_batch): loss.backward()
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from featherlm.errors import ConfigError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Dist:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started: bool = False  # this code started the process group (and ends it in ``teardown``)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """The process group when launched by torchrun (``WORLD_SIZE`` > 1), and this process's device."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError("train.device cuda: no CUDA device is available (torch built for "
                          f"{'CPU only' if torch.version.cuda is None else 'CUDA, but none found'})")
    use_cuda = device == "cuda" or (device == "auto" and cuda)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        started = True
    if world > 1:
        return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, dev, started)
    return Dist(0, 1, 0, dev, False)


def teardown(dist: Dist) -> None:
    if dist.started and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap(model: nn.Module, dist: Dist, *, fsdp: bool, blocks: Iterable[nn.Module] = ()) -> nn.Module:
    """``model`` ready for data-parallel training: FSDP2 (each of ``blocks`` its own shard unit, then
    the rest), DDP when there are several processes, itself otherwise."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if dist.world > 1 or torch_dist.is_initialized():
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
        return model  # one process: nothing to shard
    if dist.world > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes in this block reduce gradients across processes only when ``sync``: the
    micro-batches before the last of a step just accumulate locally (DDP ``no_sync``; FSDP2
    ``set_requires_gradient_sync``)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with nullcontext() if sync else model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
    yield


def all_sum(values: list[float], dist: Dist) -> list[float]:
    """Each value summed over the processes (the values themselves when alone)."""
    if dist.world == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch_dist.barrier()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state by parameter name) unsharded on CPU; a collective call under
    FSDP (every rank calls it; rank 0 gets the tensors). Names carry no DDP ``module.`` prefix."""
    model_state, optim_state = get_state_dict(model, optimizer, options=FULL)
    return model_state, optim_state.get("state", {})  # other ranks get empty dicts


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict[str, dict]) -> None:
    """Put a ``full_state`` back (every rank passes the whole state; FSDP keeps its shard)."""
    options = StateDictOptions(full_state_dict=True)  # no CPU offload: every rank gets the param groups
    _, template = get_state_dict(model, optimizer, options=options)  # param groups as parameter names
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": optim_state, "param_groups": template["param_groups"]}, options=options)


def grad_norm_value(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float (a DTensor under FSDP2)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
