"""SmolLM2-135M-Instruct + LoRA SFT on an instruction mix: held-out response loss and answers, before/after.

Dolly and other large instruction sets are not in ../shared/data, so the mix is built here from the
real data that is (``--out``/mix.jsonl, never committed):
  - Stanford Alpaca's 175 human-written seed tasks (instruction, optional input, output);
  - SST-2 sentences -> "Is the sentiment of this review positive or negative?" -> the gold label;
  - Tatoeba English-French pairs -> "Translate into French" -> the reference translation;
  - CoNLL-2003 sentences -> "List the people, organisations and places named" -> the gold entities.
The last three are templated over gold annotations written by people, so every response is a
correct, human-made answer. A seeded share (``data.eval_ratio``) is held out: its response-token
loss is measured before tuning (LoRA starts as the identity, so that is the base model) and after,
with the final (``last``) weights: ``best`` is chosen by this same held-out loss. Then the first
held-out prompt of each source is answered greedily by both models.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sft_smollm2.py --out runs/sft-mix [--per-task 150] [--epochs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FEATHERLM_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))

from featherlm.checkpoint import read_checkpoint  # noqa: E402
from featherlm.data import IGNORE_INDEX  # noqa: E402
from featherlm.data.tasks import encode_chat, row_conversations  # noqa: E402
from featherlm.generate import GenerationConfig, generate  # noqa: E402
from featherlm.hub import resolve  # noqa: E402
from featherlm.train import finetune, load_config, load_run  # noqa: E402
from featherlm.train.run import build_for_run  # noqa: E402
from featherlm.train.tasks import TaskData  # noqa: E402

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
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (a smoke test)")
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
        # batches of 8 bucketed by length pad ~7%; the eval at each epoch's end logs the curve (and `best`, unused)
        "train": {"lr": 3e-4, "epochs": args.epochs, "batch_size": 8, "max_seq_len": args.max_seq_len,
                  "warmup_ratio": 0.05, "schedule": "cosine", "log_every": 5, "seed": args.seed,
                  "max_steps": args.max_steps},
        "out": {"dir": str(out / "run"), "overwrite": True},
    }
    cfg = load_config(settings)
    checkpoint = read_checkpoint(resolve(MODEL))
    tokenizer = checkpoint.tokenizer
    task = cfg.task
    examples = task.read(cfg, str(data), tokenizer)
    assert len(examples) == len(mix) and not examples.skipped, "one SFT example per row of the mix"
    cut = sum(len(encode_chat(tokenizer, row_conversations(r)[0])[0]) > args.max_seq_len for r in mix)
    train, held = task.split(examples, cfg.data.eval_ratio, cfg.train.seed)
    # the same seeded split over row numbers: which rows (sources, prompts) are held out
    _, held_index = task.split(TaskData("", list(range(len(mix)))), cfg.data.eval_ratio, cfg.train.seed)
    held_rows = [mix[i] for i in held_index.examples]
    assert all(e["input_ids"] == examples.examples[i]["input_ids"] for e, i in zip(held.examples, held_index.examples,
                                                                                   strict=True))
    pad_id = tokenizer.pad_id or 0
    base, _ = build_for_run(cfg, checkpoint)  # LoRA B = 0: exactly the base model
    before = held_loss(task, base, held, held_rows, cfg, tokenizer, pad_id)

    started, cpu = time.perf_counter(), time.process_time()
    summary = finetune(cfg, progress=not args.json)
    minutes, cpu_minutes = (time.perf_counter() - started) / 60, (time.process_time() - cpu) / 60
    # the final weights (`last`), not `best`: the trainer picks `best` by this same held-out loss
    tuned, _, _ = load_run(out / "run", checkpoint="last")
    after = held_loss(task, tuned, held, held_rows, cfg, tokenizer, pad_id)

    # the first held-out row of each source (split order, not picked by outcome) answered by both models
    gen = GenerationConfig(max_new_tokens=64, temperature=0.0, repetition_penalty=1.1)
    answers = []
    for row, example in zip(held_rows, held.examples, strict=True):
        if row["source"] in {a["source"] for a in answers} or len(answers) >= args.answers:
            continue
        first = next(i for i, x in enumerate(example["labels"]) if x != IGNORE_INDEX)
        prompt = example["input_ids"][:first]  # the training prompt's own tokens (chat template included)
        answers.append({"source": row["source"], "prompt": row_conversations(row)[0][-2]["content"],
                        "reference": row["output"],
                        "before": generate(base.eval(), tokenizer, prompt, gen).text.strip(),
                        "after": generate(tuned, tokenizer, prompt, gen).text.strip()})
    result = {"examples": len(mix), "train_examples": len(train), "held_out": len(held),
              "cut_at_max_seq_len": cut, "max_seq_len": args.max_seq_len, "epochs": args.epochs,
              "steps": summary["step"], "held_out_tokens": before["tokens"],
              "held_out_loss_before": before["loss"], "held_out_loss_after": after["loss"],
              "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
              "by_source": {s: {"tokens": b["tokens"], "loss_before": b["loss"],
                                "loss_after": after["by_source"][s]["loss"]} for s, b in before["by_source"].items()},
              "best_step": summary["best_step"], "train_minutes": round(minutes, 2),
              "train_cpu_minutes": round(cpu_minutes, 2), "trainable_params": summary["trainable_params"],
              "answers": answers}
    (out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(f"{len(mix)} pairs ({len(train)} train, {len(held)} held out, {cut} cut at {args.max_seq_len} tokens); "
          f"LoRA r=8 on q,k,v,o,gate,up,down ({summary['trainable_params']:,} trainable), {args.epochs} epochs "
          f"({summary['step']} steps) in {minutes:.1f} min ({cpu_minutes:.1f} CPU min)")
    print(f"held-out response loss ({before['tokens']} tokens): {before['loss']:.3f} -> {after['loss']:.3f} "
          f"(perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f})")
    for s, r in result["by_source"].items():
        print(f"  {s:14s} {r['tokens']:5d} tokens: {r['loss_before']:.3f} -> {r['loss_after']:.3f}")
    for a in answers:
        print(f"\n[{a['source']}] {a['prompt']}\n  reference: {a['reference']}\n  before:    {a['before']}"
              f"\n  after:     {a['after']}")


def held_loss(task, model, held: TaskData, rows: list[dict], cfg, tokenizer, pad_id: int) -> dict:
    """Response-token loss over the held-out share, in all and per source (the task's own evaluate)."""
    by_source = {}
    for source in sorted({r["source"] for r in rows}):
        part = TaskData(held.path, [e for e, r in zip(held.examples, rows, strict=True) if r["source"] == source])
        by_source[source] = task.evaluate(model, part, cfg=cfg, tokenizer=tokenizer, batch_size=16, pad_id=pad_id)
    tokens = sum(r["tokens"] for r in by_source.values())
    loss = sum(r["loss"] * r["tokens"] for r in by_source.values()) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "by_source": by_source}


if __name__ == "__main__":
    main()
