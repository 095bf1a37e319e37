"""LoRA fine-tuning against Hugging Face transformers + peft: throughput and peak memory, or accuracy.

Both sides fine-tune MiniLM-L6 (all-MiniLM-L6-v2, the embedded default) for SST-2 sentiment with one
recipe, examples/sst2-lora.yaml: LoRA r=4, alpha=8, dropout 0.05 on the 6 linears of every block (q,
k, v, attention output, FFN up, FFN down), a fresh 2-way classifier on mean-pooled states trained
fully (the recipe's ``pooling: mean``; dropout 0.1 before it, none in the backbone: featherlm's
backbone has none, so HF's BERT dropouts are set to 0), AdamW (lr 1e-3, weight decay 0.01), batch
32, max_seq_len 64, fp32, one seed. featherlm builds its model as the trainer does (``build_for_run``
on the recipe); transformers gets a ``BertModel`` (no pooler: the head does not use it) + mean
pooling over real tokens + dropout + ``nn.Linear``, wrapped by ``peft.get_peft_model``. The token
ids are featherlm's tokenizer's (transformers' own tokenizer gives the same ids: ``--accuracy``
checks it on the dev set).

Speed (the default): the same batches on both sides, ``--batches random`` (a seeded sample of
train.tsv padded per batch to its longest: the trainer's default order) or ``--batches recipe``
(the recipe's own length-bucketed batches: little padding). One plain loop drives both (forward,
cross-entropy, backward, clip 1.0, step, zero_grad), so only the model implementations differ.
Each side runs in its own subprocess so that its peak RSS (``ru_maxrss``, imports and weights
included) is its own; the RSS just before the first step is reported too. After ``--warmup``
steps, ``--steps`` steps are timed: tokens/s counts real (non-pad) tokens, per wall-clock second
and per CPU second of the process (steadier on a shared machine). ``--repeats N`` alternates the
sides N times and reports each side's fastest run. The final and mean training losses of the timed
steps are a sanity check: they should be close.

Accuracy (``--accuracy --examples N``): each side trains the whole recipe on its first N examples
(the recipe's seeded subset, its batches, schedule and optimizer: see ``accuracy_side``) and is
scored on the 872 dev sentences.

    .venv/bin/python bench/finetune.py [--batches random|recipe] [--steps 30] [--warmup 3] [--repeats 1] [--json]
    .venv/bin/python bench/finetune.py --accuracy [--examples 8000] [--seed 0] [--json]
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
# the 6 linears of each BERT layer, featherlm's names and transformers' ("layer.N.output.dense" is the
# FFN down projection only)
FEATHERLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
HF_TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
              r"|intermediate\.dense|output\.dense)")


def rss_mb() -> float:
    """Current resident set size in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_batches(tokenizer, n_batches: int, batch_size: int, max_len: int, seed: int,
                 order: str = "random") -> tuple[list, list[str]]:
    """``n_batches`` padded batches of SST-2 train, and the label names.

    ``order`` "random": a seeded random sample, each batch padded to its longest example.
    "recipe": the first batches featherlm's trainer runs for examples/sst2-lora.yaml (its 48,000-example
    subset in its length-bucketed order, so little padding).
    """
    from featherlm.data import batch_order, collate
    from featherlm.data.tasks import encode_classification, read_classification

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if order == "recipe":
        from featherlm.train import load_config

        cfg = load_config(ROOT / "examples/sst2-lora.yaml", overrides=[
            "--train.seed", str(seed), "--train.batch_size", str(batch_size), "--train.max_seq_len", str(max_len)])
        data = cfg.task.subset(cfg.task.read(cfg, cfg.data.train, tokenizer), cfg.data.max_train_examples, seed)
        index = batch_order([len(e["input_ids"]) for e in data.examples], batch_size, seed=seed, epoch=0,
                            bucket=cfg.data.bucket_by_length)[:n_batches]
        return [collate([data.examples[i] for i in b], pad) for b in index], list(cfg.model.labels)
    data = read_classification(DATA / "sentiment/sst2/train.tsv", text_column="sentence", label_column="label")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: n_batches * batch_size].tolist()
    data = replace(data, texts=[data.texts[i] for i in pick], labels=[data.labels[i] for i in pick])
    examples = encode_classification(data, tokenizer, max_len)
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
    """The model to train on ``side``, with the recipe's LoRA applied and the head trainable."""
    from featherlm.train import load_config

    cfg = load_config(ROOT / "examples/sst2-lora.yaml", overrides=["--train.seed", str(seed)])
    if side == "featherlm":
        from featherlm.train.run import build_for_run

        cfg.model.labels = labels
        return build_for_run(cfg)[0]
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    from featherlm.hub import resolve

    assert cfg.model.pooling == "mean" and sorted(cfg.peft.target_modules) == sorted(FEATHERLM_TARGETS)
    torch.manual_seed(seed)
    # no pooler: the head mean-pools the last hidden states, BERT's pooler output would be unused work
    bert = BertModel.from_pretrained(resolve(cfg.model.name), hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, dtype=torch.float32, add_pooling_layer=False)
    config = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                        target_modules=HF_TARGETS, modules_to_save=["classifier"])
    return get_peft_model(HFClassifier(bert, len(labels), cfg.model.dropout), config)


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Train ``side`` for warm-up + timed steps; its throughput, memory and losses."""
    from featherlm.checkpoint import read_checkpoint
    from featherlm.hub import resolve

    tokenizer = read_checkpoint(resolve("minilm-l6")).tokenizer
    batches, labels = make_batches(tokenizer, args.warmup + args.steps, args.batch_size, args.max_seq_len, args.seed,
                                   args.batches)
    del tokenizer
    model = build(side, labels, args.seed).train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora = sum(hasattr(m, "adapter_A") or hasattr(m, "lora_A") for m in model.modules())  # adapted linears
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    torch.manual_seed(args.seed)  # same dropout stream from here on
    rss_start, elapsed, cpu, tokens, losses = rss_mb(), 0.0, 0.0, 0, []
    for i, batch in enumerate(batches):
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            elapsed += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(loss.detach()))
    return {"side": side, "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu,
            "examples_per_s": args.steps * args.batch_size / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_train_mb": rss_start,
            "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses), "lora_modules": lora,
            "trainable_params": sum(p.numel() for p in params), "timed_tokens": tokens,
            "padding": 1 - tokens / sum(b["attention_mask"].numel() for b in batches[args.warmup:])}


def accuracy_side(side: str, args: argparse.Namespace) -> dict:
    """Train ``side`` with the whole recipe on ``args.examples`` SST-2 examples; its dev accuracy.

    featherlm: its own trainer, ``finetune(examples/sst2-lora.yaml)``, evaluating once at the end.
    transformers: a plain loop that repeats the trainer's recipe step for step with featherlm's data
    helpers, so both see the same examples in the same batches: the seeded subset, the
    length-bucketed seeded batch order, linear warmup + decay, AdamW with weight decay on matrices
    only, clipping, mean cross-entropy.
    """
    import tempfile

    from featherlm.train import finetune, load_config
    from featherlm.train.trainer import lr_factor, read_data

    overrides = ["--data.max_train_examples", str(args.examples), "--train.eval_every", "0",
                 "--train.seed", str(args.seed), "--out.plot", "false"]
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if side == "featherlm":
        with tempfile.TemporaryDirectory() as out:
            summary = finetune(ROOT / "examples/sst2-lora.yaml", overrides=[*overrides, "--out.dir", out],
                               progress=False)
        ev = summary["eval"]
        return {"side": side, "accuracy": ev["accuracy"], "eval_loss": ev["loss"], "steps": summary["step"],
                "train_loss_last_log": summary["train_loss"], "train_examples": summary["train_examples"],
                "eval_examples": summary["eval_examples"], "trainable_params": summary["trainable_params"],
                "wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    from featherlm.checkpoint import read_checkpoint
    from featherlm.data import batch_order
    from featherlm.hub import resolve

    cfg = load_config(ROOT / "examples/sst2-lora.yaml", overrides=overrides)
    t, task = cfg.train, cfg.task
    tokenizer = read_checkpoint(resolve(cfg.model.name)).tokenizer
    train, dev, _ = read_data(cfg, task, tokenizer)  # the trainer's reader: same subset, same token ids
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    model = build("transformers", cfg.model.labels, t.seed).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8)
    lengths = [len(e["input_ids"]) for e in train.examples]
    steps_per_epoch = -(-len(train) // t.batch_size)
    total = t.epochs * steps_per_epoch
    warmup = round(t.warmup_ratio * total)
    losses = []
    for step in range(total):
        epoch, k = divmod(step, steps_per_epoch)
        index = batch_order(lengths, t.batch_size, seed=t.seed, epoch=epoch, bucket=cfg.data.bucket_by_length)[k]
        batch = task.collate([train.examples[i] for i in index], pad)
        for group in optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(step, total, warmup, t.schedule)
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_s = (time.perf_counter() - start_wall, time.process_time() - start_cpu)
    model.eval()
    correct, eval_loss = 0, 0.0
    with torch.no_grad():
        for _, batch in task.batches(dev.examples, 2 * t.batch_size, pad):  # the trainer's eval batches
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            eval_loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    log = t.log_every
    return {"side": side, "accuracy": correct / len(dev), "eval_loss": eval_loss / len(dev), "steps": total,
            "train_loss_last_log": sum(losses[-log:]) / len(losses[-log:]), "train_examples": len(train),
            "eval_examples": len(dev), "trainable_params": sum(p.numel() for p in params),
            "wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu,
            "train_wall_s": train_s[0], "train_cpu_s": train_s[1], "tokenizer_mismatches": hf_tokenizer_check(dev),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def hf_tokenizer_check(data) -> int:
    """How many dev examples transformers' own tokenizer encodes differently (0: the shared token ids are
    what a transformers user would get)."""
    from transformers import AutoTokenizer

    from featherlm.data.tasks import read_classification
    from featherlm.hub import resolve

    texts = read_classification(data.path, text_column="sentence", label_column="label").texts
    hf = AutoTokenizer.from_pretrained(resolve("minilm-l6"))(texts, truncation=True, max_length=64)["input_ids"]
    return sum(a != e["input_ids"] for a, e in zip(hf, data.examples, strict=True))


def run_sides(repeats: int, passed: list[str]) -> dict[str, dict]:
    """Each side ``repeats`` times in its own subprocess, alternating (so a change of machine load hits
    both); per side the fastest run (the least disturbed), with the largest memory seen."""
    runs: dict[str, list[dict]] = {"featherlm": [], "transformers": []}
    for _ in range(repeats):
        for side, done in runs.items():
            out = subprocess.run([sys.executable, __file__, "--side", side, *passed], check=True,
                                 capture_output=True, text=True, cwd=ROOT)
            done.append(json.loads(out.stdout.strip().splitlines()[-1]))
    sides = {}
    for side, done in runs.items():
        best = max(done, key=lambda r: r["tokens_per_s"])
        sides[side] = {**best, "tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in done),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in done),
                       "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in done]}
    return sides


def main_accuracy(args: argparse.Namespace, passed: list[str]) -> int:
    sides = run_sides(args.repeats, passed)
    f, t = sides["featherlm"], sides["transformers"]
    diff = 100 * (f["accuracy"] - t["accuracy"])
    print(f"minilm-l6 LoRA on SST-2, recipe examples/sst2-lora.yaml on {f['train_examples']} training examples "
          f"({f['steps']} steps), dev accuracy on {f['eval_examples']} sentences, seed {args.seed}")
    print(f"{'side':<14}{'accuracy':>10}{'dev loss':>10}{'train loss':>12}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}")
    for r in (f, t):
        print(f"{r['side']:<14}{r['accuracy']:>10.4f}{r['eval_loss']:>10.4f}{r['train_loss_last_log']:>12.4f}"
              f"{r['wall_s']:>9.0f}{r['cpu_s']:>9.0f}{r['peak_rss_mb']:>13.0f}")
    print(f"accuracy difference featherlm - transformers: {diff:+.2f} points "
          f"({'within' if abs(diff) <= 1.0 else 'OUTSIDE'} 1 point); dev examples transformers' tokenizer "
          f"encodes differently: {t['tokenizer_mismatches']}")
    if args.json:
        print(json.dumps({"accuracy_diff_points": diff, "seed": args.seed, "sides": sides}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["featherlm", "transformers"], help="run one side only (used by the parent)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; the fastest is reported "
                   "(a loaded machine slows some runs down)")
    p.add_argument("--batches", choices=["random", "recipe"], default="random",
                   help="random: a seeded sample padded per batch; recipe: the trainer's length-bucketed batches")
    p.add_argument("--json", action="store_true")
    p.add_argument("--accuracy", action="store_true", help="train both sides with the whole recipe and compare "
                   "dev accuracy (instead of timing steps)")
    p.add_argument("--examples", type=int, default=8000, help="--accuracy: training examples (the recipe: 48000)")
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps((accuracy_side if args.accuracy else run_side)(args.side, args)))
        return 0

    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.accuracy:
        return main_accuracy(args, passed)
    sides = run_sides(args.repeats, passed)
    f, t = sides["featherlm"], sides["transformers"]
    import peft
    import transformers

    meta = {"model": "minilm-l6", "batches": args.batches, "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
    ratios = {"tokens_per_s_ratio": f["tokens_per_s"] / t["tokens_per_s"],
              "tokens_per_cpu_s_ratio": f["tokens_per_cpu_s"] / t["tokens_per_cpu_s"],
              "peak_rss_ratio": f["peak_rss_mb"] / t["peak_rss_mb"],
              "final_loss_abs_diff": abs(f["final_loss"] - t["final_loss"]),
              "mean_loss_abs_diff": abs(f["mean_loss"] - t["mean_loss"])}
    print(f"minilm-l6 LoRA r=4 on SST-2, {args.batches} batches of {args.batch_size}, max_seq_len "
          f"{args.max_seq_len}, fp32, {args.steps} timed steps after {args.warmup} warm-up, {meta['threads']} threads; "
          f"padding {100 * f['padding']:.0f}% of the positions; best of {args.repeats} alternating runs per side")
    print(f"{'side':<14}{'tok/s':>9}{'tok/CPU-s':>11}{'ex/s':>8}{'peak RSS MB':>13}{'RSS@start MB':>14}"
          f"{'final loss':>12}{'mean loss':>11}{'LoRA mods':>11}{'trainable':>11}")
    for r in (f, t):
        print(f"{r['side']:<14}{r['tokens_per_s']:>9.1f}{r['tokens_per_cpu_s']:>11.1f}{r['examples_per_s']:>8.1f}{r['peak_rss_mb']:>13.0f}"
              f"{r['rss_before_train_mb']:>14.0f}{r['final_loss']:>12.4f}{r['mean_loss']:>11.4f}"
              f"{r['lora_modules']:>11}{r['trainable_params']:>11,}")
    print(f"ratio featherlm/transformers: tokens/s {ratios['tokens_per_s_ratio']:.2f}x (per CPU second "
          f"{ratios['tokens_per_cpu_s_ratio']:.2f}x), peak RSS {ratios['peak_rss_ratio']:.2f}x")
    if args.repeats > 1:
        print(f"tokens/s of every run: featherlm {f['all_tokens_per_s']}, transformers {t['all_tokens_per_s']}")
    print(f"loss |difference|: final {ratios['final_loss_abs_diff']:.4f}, mean of timed steps "
          f"{ratios['mean_loss_abs_diff']:.4f}")
    if args.json:
        print(json.dumps({**meta, **ratios, "sides": sides}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
