"""Data-parallel fine-tuning: two processes under torchrun train exactly as one does.

The same global batch is split across the processes and the gradients summed, so with dropout
off the loss curve and the final adapter must match a single-process run (up to float summation
order). torchrun is launched as a real subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from featherlm.train import finetune

REPO = Path(__file__).resolve().parents[2]


def settings(model: str, train: Path, dev: Path, out: Path) -> list[str]:
    # batch 8 split over grad_accum 2 micro-batches of 4 (2 per process): sharding and accumulation at once
    return ["--model.name", model, "--model.task", "classification", "--model.dropout", "0",
            "--data.train", str(train), "--data.eval", str(dev), "--peft.method", "lora", "--peft.dropout", "0",
            "--train.batch_size", "4", "--train.grad_accum", "2", "--train.max_steps", "6", "--train.lr", "1e-2",
            "--train.log_every", "1", "--train.eval_every", "3", "--out.dir", str(out), "--out.plot", "false"]


def losses(run: Path) -> list[tuple[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["loss"]) for r in rows]


@pytest.mark.parametrize("nproc", [2])
def test_two_processes_match_one(tiny_checkpoint, sentiment_files, tmp_path, nproc):
    model = tiny_checkpoint("bert")
    train, dev = sentiment_files
    single = tmp_path / "single"
    finetune({}, overrides=settings(model, train, dev, single), progress=False)

    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "featherlm.cli", "finetune", "--json", *settings(model, train, dev, multi)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = losses(single), losses(multi)
    assert [s for s, _ in a] == [s for s, _ in b]  # same log lines: 6 train, 2 eval
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) < 1e-5 * max(1.0, abs(x)), (a, b)
    w1 = load_file(str(single / "last" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(multi / "last" / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for key in w1:
        assert (w1[key] - w2[key]).abs().max() < 1e-5, key
    assert losses(single)[0][1] != losses(single)[-2][1]  # it trained: the curve moved
