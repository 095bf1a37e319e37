"""SmolLM2-135M-Instruct + LoRA SFT on an instruction mix: held-out response loss and answers, before/after.

Dolly and other large instruction sets are not in ../shared/data, so the mix is built here from the
real data that is (``--out``/mix.jsonl, never committed):
  - Stanford Alpaca's 175 human-written seed tasks (instruction, optional input, output);
  - SST-2 sentences -> "Is the sentiment of this review positive or negative?" -> the gold label;
  - Tatoeba English-French pairs -> "Translate into French" -> the reference translation;
  - CoNLL-2003 sentences -> "List the people, organisations and places named" -> the gold entities.
The last three are templated over gold annotations written by people, so every response is a
correct, human-made answer. A seeded share (``data.eval_ratio``) is held out: its response-token
loss is measured before tuning (LoRA starts as the identity, so that is the base model) and after.
Then a few held-out prompts are answered greedily by both models.

    .venv/bin/python bench/sft_smollm2.py --out runs/sft-mix [--per-task 150] [--epochs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FEATHERLM_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))

from featherlm.checkpoint import read_checkpoint  # noqa: E402
from featherlm.generate import GenerationConfig, generate  # noqa: E402
from featherlm.hub import resolve  # noqa: E402
from featherlm.train import finetune, load_config, load_run  # noqa: E402
from featherlm.train.run import build_for_run  # noqa: E402

MODEL = "smollm2-135m-instruct"


def conll_sentences(path: Path) -> list[tuple[list[str], list[str]]]:
    out, words, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if words:
                out.append((words, tags))
            words, tags = [], []
            continue
        parts = line.split()
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        out.append((words, tags))
    return out


def entities(words: list[str], tags: list[str]) -> list[tuple[str, str]]:
    spans, current = [], None
    for w, t in zip(words, tags, strict=True):
        if t.startswith("B-") or (t.startswith("I-") and (current is None or current[0] != t[2:])):
            current = [t[2:], [w]]
            spans.append(current)
        elif t.startswith("I-") and current is not None:
            current[1].append(w)
        else:
            current = None
    return [(kind, " ".join(ws)) for kind, ws in spans]


def build_mix(per_task: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for line in (DATA / "instruct/alpaca-seed-tasks/seed_tasks.jsonl").read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        for inst in task["instances"]:
            if len(task["instruction"]) + len(inst["input"]) + len(inst["output"]) > 1500:
                continue  # a few news-article tasks: too long for a 512-token CPU budget
            rows.append({"instruction": task["instruction"], "input": inst["input"], "output": inst["output"],
                         "source": "alpaca-seed"})
    # split on "\n" only: every SST-2 sentence ends in a stray "\r" that universal newlines would split at
    lines = (DATA / "sentiment/sst2/train.tsv").read_bytes().decode("utf-8").split("\n")[1:]
    sst = [[field.strip() for field in ln.split("\t")] for ln in lines]
    sst = [r for r in sst if len(r) == 2 and len(r[0].split()) >= 6]
    for text, label in rng.sample(sst, per_task):
        rows.append({"instruction": "Is the sentiment of this movie review positive or negative?",
                     "input": text.strip(), "output": "Positive." if label.strip() == "1" else "Negative.",
                     "source": "sst2"})
    pairs = [ln.split("\t") for ln in (DATA / "translation/tatoeba-en-fr/fra-5k.txt").read_text().splitlines()]
    # the file is the export's first 5,000 pairs: short sentences, several translations of each
    pairs = list({p[0]: p for p in pairs if len(p) >= 2 and len(p[0].split()) >= 3}.values())
    for en, fr, *_ in rng.sample(pairs, per_task):
        rows.append({"instruction": "Translate this sentence into French.", "input": en, "output": fr,
                     "source": "tatoeba-en-fr"})
    sentences = [s for s in conll_sentences(DATA / "ner/conll2003/train.txt") if 6 <= len(s[0]) <= 30]
    names = {"PER": "person", "ORG": "organisation", "LOC": "place", "MISC": "other"}
    for words, tags in rng.sample(sentences, per_task):
        found = entities(words, tags)
        answer = "; ".join(f"{text} ({names[kind]})" for kind, text in found) if found else "None."
        rows.append({"instruction": "List the people, organisations and places named in this sentence.",
                     "input": " ".join(words), "output": answer, "source": "conll2003"})
    rng.shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sft-mix")
    ap.add_argument("--per-task", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answers", type=int, default=4, help="held-out prompts answered before/after")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = build_mix(args.per_task, args.seed)
    data = out / "mix.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "source"}) + "\n" for r in mix))
    settings = {
        "model": {"name": MODEL, "task": "sft"},
        "data": {"train": str(data), "eval_ratio": 0.12, "bucket_by_length": True},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "train": {"lr": 3e-4, "epochs": args.epochs, "batch_size": 8, "max_seq_len": 512, "warmup_ratio": 0.05,
                  "schedule": "cosine", "log_every": 5, "seed": args.seed},
        "out": {"dir": str(out / "run"), "overwrite": True},
    }
    cfg = load_config(settings)
    checkpoint = read_checkpoint(resolve(MODEL))
    tokenizer = checkpoint.tokenizer
    task = cfg.task
    train, held = task.split(task.read(cfg, str(data), tokenizer), cfg.data.eval_ratio, cfg.train.seed)
    base, _ = build_for_run(cfg, checkpoint)  # LoRA B = 0: exactly the base model
    before = task.evaluate(base, held, cfg=cfg, tokenizer=tokenizer, batch_size=16, pad_id=tokenizer.pad_id or 0)

    started = time.perf_counter()
    summary = finetune(cfg, progress=not args.json)
    minutes = (time.perf_counter() - started) / 60
    tuned, _, _ = load_run(out / "run")
    after = task.evaluate(tuned, held, cfg=cfg, tokenizer=tokenizer, batch_size=16, pad_id=tokenizer.pad_id or 0)

    # held-out rows, in the split's order: the prompts whose answers are compared
    held_rows = [mix[i] for i in sorted(_held_indices(len(mix), cfg))]
    assert len(held_rows) == len(held), "one SFT example per row of the mix"
    gen = GenerationConfig(max_new_tokens=64, temperature=0.0, repetition_penalty=1.1)
    answers = []
    seen_sources = set()
    for row in held_rows:
        if row["source"] in seen_sources or len(answers) >= args.answers:
            continue
        seen_sources.add(row["source"])
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}])
        answers.append({"source": row["source"], "prompt": user, "reference": row["output"],
                        "before": generate(base.eval(), tokenizer, prompt, gen).text.strip(),
                        "after": generate(tuned, tokenizer, prompt, gen).text.strip()})
    result = {"examples": len(mix), "train_examples": len(train), "held_out": len(held),
              "held_out_loss_before": before["loss"], "held_out_loss_after": after["loss"],
              "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
              "train_minutes": round(minutes, 2), "trainable_params": summary["trainable_params"],
              "answers": answers}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(f"{len(mix)} pairs ({len(train)} train, {len(held)} held out); LoRA r=8 on q,k,v,o,gate,up,down "
          f"({summary['trainable_params']:,} trainable), {args.epochs} epochs in {minutes:.1f} min")
    print(f"held-out response loss: {before['loss']:.3f} -> {after['loss']:.3f} "
          f"(perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f})")
    for a in answers:
        print(f"\n[{a['source']}] {a['prompt']}\n  reference: {a['reference']}\n  before:    {a['before']}"
              f"\n  after:     {a['after']}")


def _held_indices(n: int, cfg) -> set[int]:
    """Indices of the held-out rows: Task.split's seeded choice (one example per row in this mix)."""
    import torch

    k = min(max(1, round(cfg.data.eval_ratio * n)), n - 1)
    return set(torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed + 1)).tolist()[:k])


if __name__ == "__main__":
    main()
