"""LoRA fine-tuning throughput and peak memory of featherlm against Hugging Face transformers + peft.

Both sides fine-tune MiniLM-L6 (all-MiniLM-L6-v2, the embedded default) for SST-2 sentiment with one
recipe: LoRA r=4, alpha=8, dropout 0.05 on the 6 linears of every block (q, k, v, attention output,
FFN up, FFN down), a fresh 2-way classifier on mean-pooled states trained fully (dropout 0.1 before
it, none in the backbone: featherlm's backbone has none, so HF's BERT dropouts are set to 0), AdamW
(lr 1e-3, weight decay 0.01), batch 32, max_seq_len 64, fp32, one seed. featherlm builds its model
as the trainer does (``build_for_run`` on ``examples/sst2-lora.yaml``); transformers gets a
``BertModel`` + mean pooling + ``nn.Linear`` wrapped by ``peft.get_peft_model``. The batches are the
same on both sides: a seeded sample of train.tsv, tokenised once with featherlm's tokenizer, padded
per batch to the longest. One plain loop drives both (forward, cross-entropy, backward, clip 1.0,
step, zero_grad), so only the model implementations differ.

Each side runs in its own subprocess (``--side``) so that its peak RSS (``ru_maxrss``, imports and
weights included) is its own; the RSS just before the first step is reported too. After
``--warmup`` steps, ``--steps`` steps are timed: tokens/s counts real (non-pad) tokens. The final
and mean training losses of the timed steps are a sanity check: they should be close.

    .venv/bin/python bench/finetune.py [--steps 30] [--warmup 3] [--batch-size 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FEATHERLM_DATA", ROOT.parent / "shared" / "data"))
# the 6 linears of each BERT layer; "layer.N.output.dense" is the FFN down projection only
HF_TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
              r"|intermediate\.dense|output\.dense)")


def rss_mb() -> float:
    """Current resident set size in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_batches(tokenizer, n_batches: int, batch_size: int, max_len: int, seed: int) -> tuple[list, list[str]]:
    """``n_batches`` padded batches of a seeded random sample of SST-2 train, and the label names."""
    from featherlm.data import collate
    from featherlm.data.tasks import encode_classification, read_classification

    data = read_classification(DATA / "sentiment/sst2/train.tsv", text_column="sentence", label_column="label")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: n_batches * batch_size].tolist()
    data = replace(data, texts=[data.texts[i] for i in pick], labels=[data.labels[i] for i in pick])
    examples = encode_classification(data, tokenizer, max_len)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return [collate(examples[i: i + batch_size], pad) for i in range(0, len(examples), batch_size)], data.label_names


class HFClassifier(nn.Module):
    """BertModel -> mean pooling over real tokens -> dropout -> linear head."""

    def __init__(self, bert: nn.Module, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=bert.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return self.classifier(self.dropout((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)))


def build(side: str, labels: list[str], seed: int) -> nn.Module:
    """The model to train on ``side``, with LoRA applied and the head trainable."""
    if side == "featherlm":
        from featherlm.train import load_config
        from featherlm.train.run import build_for_run

        cfg = load_config(ROOT / "examples/sst2-lora.yaml", overrides=["--train.seed", str(seed)])
        cfg.model.labels = labels
        return build_for_run(cfg)[0]
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    from featherlm.hub import resolve

    torch.manual_seed(seed)
    bert = BertModel.from_pretrained(resolve("minilm-l6"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=HF_TARGETS, modules_to_save=["classifier"])
    return get_peft_model(HFClassifier(bert, len(labels), 0.1), config)


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Train ``side`` for warm-up + timed steps; its throughput, memory and losses."""
    from featherlm.checkpoint import read_checkpoint
    from featherlm.hub import resolve

    tokenizer = read_checkpoint(resolve("minilm-l6")).tokenizer
    batches, labels = make_batches(tokenizer, args.warmup + args.steps, args.batch_size, args.max_seq_len, args.seed)
    del tokenizer
    model = build(side, labels, args.seed).train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora = sum(hasattr(m, "adapter_A") or hasattr(m, "lora_A") for m in model.modules())  # adapted linears
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    torch.manual_seed(args.seed)  # same dropout stream from here on
    rss_start, elapsed, tokens, losses = rss_mb(), 0.0, 0, []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            elapsed += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(loss))
    return {"side": side, "tokens_per_s": tokens / elapsed, "examples_per_s": args.steps * args.batch_size / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_train_mb": rss_start,
            "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses), "lora_modules": lora,
            "trainable_params": sum(p.numel() for p in params), "timed_tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["featherlm", "transformers"], help="run one side only (used by the parent)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return 0

    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    sides = {}
    for side in ("featherlm", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--side", side, *passed], check=True, capture_output=True,
                             text=True, cwd=ROOT)
        sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
    f, t = sides["featherlm"], sides["transformers"]
    import peft
    import transformers

    meta = {"model": "minilm-l6", "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
            "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
    ratios = {"tokens_per_s_ratio": f["tokens_per_s"] / t["tokens_per_s"],
              "peak_rss_ratio": f["peak_rss_mb"] / t["peak_rss_mb"],
              "final_loss_abs_diff": abs(f["final_loss"] - t["final_loss"]),
              "mean_loss_abs_diff": abs(f["mean_loss"] - t["mean_loss"])}
    print(f"minilm-l6 LoRA r=4 on SST-2, batch {args.batch_size}, max_seq_len {args.max_seq_len}, fp32, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {meta['threads']} threads")
    print(f"{'side':<14}{'tok/s':>9}{'ex/s':>8}{'peak RSS MB':>13}{'RSS@start MB':>14}{'final loss':>12}"
          f"{'mean loss':>11}{'LoRA mods':>11}{'trainable':>11}")
    for r in (f, t):
        print(f"{r['side']:<14}{r['tokens_per_s']:>9.1f}{r['examples_per_s']:>8.1f}{r['peak_rss_mb']:>13.0f}"
              f"{r['rss_before_train_mb']:>14.0f}{r['final_loss']:>12.4f}{r['mean_loss']:>11.4f}"
              f"{r['lora_modules']:>11}{r['trainable_params']:>11,}")
    print(f"ratio featherlm/transformers: tokens/s {ratios['tokens_per_s_ratio']:.2f}x, "
          f"peak RSS {ratios['peak_rss_ratio']:.2f}x")
    print(f"loss |difference|: final {ratios['final_loss_abs_diff']:.4f}, mean of timed steps "
          f"{ratios['mean_loss_abs_diff']:.4f}")
    if args.json:
        print(json.dumps({**meta, **ratios, "sides": sides}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
