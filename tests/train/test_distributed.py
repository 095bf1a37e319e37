"""Data-parallel pretraining: two processes under torchrun (gloo on CPU) follow the single-process
loss curve at the same global batch, with DDP and with FSDP2; the helpers behave alone too."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from featherlm.train import distributed as dp
from featherlm.train.optim import make_adamw
from featherlm.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = ["the", "movie", "was", "a", "plot", "really", "very", "story", "and", "good", "bad", "dull"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(3, 7))) + "." for _ in range(200)) + "\n")
    return path


def settings(data: Path, out: Path, *extra: str) -> list[str]:
    # global batch 8 = 2 processes x 2 micro-batches x 2 rows: sharding and accumulation at once
    return ["--data.train", str(data), "--out.dir", str(out), "--model.n_layer", "2", "--model.n_head", "2",
            "--model.d_model", "32", "--train.block_size", "16", "--train.batch_size", "8", "--train.grad_accum",
            "2", "--train.max_steps", "6", "--train.warmup_steps", "1", "--train.lr", "1e-2", "--train.log_every",
            "1", "--train.eval_every", "3", "--train.eval_iters", "2", "--out.plot", "false", *extra]


def curve(run: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in rows]


def torchrun(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "featherlm.cli", "pretrain", "--json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 alone reports
    return json.loads(lines[0])


def assert_same_run(single: Path, multi: Path) -> None:
    a, b = curve(single), curve(multi)
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]  # 6 train lines, 2 eval lines
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert abs(x - y) < 1e-5 * max(1.0, abs(x)), (a, b)
    assert a[0][2] - a[-2][2] > 0.3  # it trained: the curve moved, so a wrong gradient would show
    w1 = load_file(str(single / "model" / "model.safetensors"))
    w2 = load_file(str(multi / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for key in w1:
        assert (w1[key] - w2[key]).abs().max() < 1e-4, key


@pytest.fixture
def single_run(corpus, tmp_path):
    out = tmp_path / "single"
    pretrain({}, overrides=settings(corpus, out), progress=False)
    return out


@pytest.mark.slow  # 12-35 s: two Python processes start and import torch (on this shared machine)
def test_ddp_two_processes_match_one(corpus, tmp_path, single_run):
    result = torchrun(settings(corpus, tmp_path / "ddp"), tmp_path)
    assert result["processes"] == 2 and result["steps"] == 6 and result["tokens"] == 6 * 8 * 16
    assert_same_run(single_run, tmp_path / "ddp")


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_alone(corpus, tmp_path, single_run):
    """FSDP2 (fully_shard per block) on CPU/gloo; its checkpoint is full state, so one process resumes it."""
    out = tmp_path / "fsdp"
    result = torchrun(settings(corpus, out, "--train.fsdp", "true"), tmp_path)
    assert result["processes"] == 2
    assert_same_run(single_run, out)
    more = pretrain({}, overrides=settings(corpus, out, "--train.max_steps", "6"), resume=True, progress=False)
    assert more["steps"] == 6 and more["processes"] == 1  # a finished run reloads and re-evaluates alone
    assert more["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- helpers, one process


def test_helpers_alone_are_plain():
    dist = dp.setup("cpu")
    assert (dist.rank, dist.world, dist.main, dist.device.type) == (0, 1, True, "cpu")
    model = nn.Linear(3, 2)
    assert dp.wrap(model, dist, fsdp=False) is model and dp.wrap(model, dist, fsdp=True) is model
    assert dp.all_sum([1.5, 2], dist) == [1.5, 2.0]
    with dp.gradient_sync(model, sync=False):  # no-op without a wrapper
        model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None


def test_full_state_round_trip_by_parameter_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.99))
    for _ in range(3):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    model_state, optim_state = dp.full_state(model, optimizer)
    assert set(optim_state) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # names, not positions
    # copies, as after a trip through a file (the dicts hold the live tensors of model and optimizer)
    model_state = {k: v.clone() for k, v in model_state.items()}
    optim_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in optim_state.items()}

    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    fresh_opt = make_adamw(fresh, 1e-2, 0.1, (0.9, 0.99))
    dp.load_full_state(fresh, fresh_opt, model_state, optim_state)
    x = torch.randn(2, 4)
    for m, o in ((model, optimizer), (fresh, fresh_opt)):  # one more step each: identical results
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
