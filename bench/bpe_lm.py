"""GPT vs LSTM vs Kneser-Ney n-gram language models over a trained BPE vocabulary, at equal wall time.

WikiText-2 is not in ``../shared/data``; the largest real English corpus there is Tiny Shakespeare
(``corpus/tinyshakespeare/input.txt``, 1.1M characters). Its first 90% of characters (cut at the
next line break) train, the rest validates, as nanoGPT's split. A byte-level BPE tokenizer of
``--vocab-size`` ids is trained on the training part only (``featherlm tokenizer train --kind bpe``),
and every model reads the same ids of the same split:

- ``gpt``: a 4 x 128 Llama-style decoder (RoPE, SwiGLU, RMSNorm; block 128, batch 12, lr 2e-3,
  the settings of ``examples/shakespeare-char.yaml``) through ``featherlm.train.pretrain``, its cosine
  schedule over the time budget (``train.schedule: time``);
- ``lstm``: 2 layers of 256, tied embeddings, dropout 0.1, truncated BPTT over 32 tokens, batch 32,
  AdamW 5e-3 (the settings of ``bench/baselines.py``) through ``featherlm.train.baseline``;
- ``ngram``: interpolated Kneser-Ney of each order in ``--orders`` (fitted in one pass: seconds).

The networks train for ``--budget`` seconds each, one thread each, counted by ``--clock``: ``wall``
(default) or ``cpu`` (CPU seconds of the network's process: on a shared, loaded machine a wall
budget buys whatever compute the other jobs leave, a CPU budget the same compute every time). The
GPT's budget covers its whole ``pretrain`` run from reading the corpus (``train.time_budget_s``),
the LSTM's its training loop. They run at the same time in two processes (``--sequential``: one
after the other), so that both see the same load; each row reports wall and CPU seconds. Validation
perplexity is per BPE token over the whole validation text: the LSTM reads it as one stream (state
carried); the GPT scores it in windows of its block every ``block / 2`` tokens, each token once,
with at least 64 tokens of context (after the first window); the n-gram model scores each token from
the ``order - 1`` before it.

    .venv/bin/python bench/bpe_lm.py [--budget 300] [--clock wall] [--vocab-size 2048] [--kinds ngram,lstm,gpt]
        [--orders 2,3,4,5] [--sequential] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FEATHERLM_DATA", ROOT.parent / "shared" / "data")) / "corpus/tinyshakespeare/input.txt"
GPT = {"model": {"arch": "llama", "n_layer": 4, "n_head": 4, "d_model": 128},
       "train": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50, "schedule": "time", "max_steps": 1_000_000,
                 "batch_size": 12, "block_size": 128, "weight_decay": 0.1, "betas": [0.9, 0.99], "threads": 1,
                 "eval_every": 0, "sample_every": 0, "log_every": 50, "seed": 0}}
LSTM = dict(d_model=256, n_layer=2, dropout=0.1, seq_len=32, batch_size=32, lr=5e-3)


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """The first 90% of the characters (up to the next line break) and the rest."""
    cut = text.find("\n", int(len(text) * (1 - val_fraction)))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def run_network(kind: str, budget: float, clock: str, paths: dict[str, str], seed: int) -> dict:
    """Train and score one network in this process (a worker of the pool, or the main process)."""
    torch.set_num_threads(1)
    from featherlm.tokenizer import Tokenizer
    from featherlm.train.baseline import evaluate_recurrent, evaluate_windows, train_lm_baseline
    from featherlm.train.pretrain import encode

    load = os.getloadavg()[0]
    tok = Tokenizer.from_dir(paths["tokenizer"])
    read = lambda name: Path(paths[name]).read_text(encoding="utf-8")  # noqa: E731
    if kind == "lstm":
        train_ids, val_ids = encode(tok, read("train")).tolist(), encode(tok, read("val")).tolist()
        # the budget counts the training loop (its own scoring gets 64 tokens; the full one follows)
        cpu, wall = time.process_time(), time.perf_counter()
        result = train_lm_baseline("lstm", train_ids, val_ids[:64], tok.vocab_size, time_budget_s=budget,
                                   clock=clock, seed=seed, **LSTM)
        train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
        wall = time.perf_counter()
        scores = evaluate_recurrent(result["model"], val_ids)
        row = {"kind": "lstm", "params": result["params"], "steps": result["steps"],
               "tokens_seen": result["tokens_seen"], "epochs": result["epochs"], "val_loss": scores["nll"],
               "val_tokens": scores["tokens"]}
    else:
        import featherlm
        from featherlm.train.pretrain import pretrain

        with tempfile.TemporaryDirectory() as tmp:
            config = {**GPT, "data": {"train": paths["train"], "val": paths["val"], "tokenizer": paths["tokenizer"]},
                      "out": {"dir": tmp, "plot": False}}
            # the budget counts the whole run from reading the corpus; its own estimate is one batch
            config["train"] = {**GPT["train"], "time_budget_s": budget, "clock": clock, "seed": seed,
                               "eval_iters": 1}
            cpu, wall = time.process_time(), time.perf_counter()
            summary = pretrain(config, progress=False)
            train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
            lm = featherlm.load(Path(tmp) / "model")
            wall = time.perf_counter()
        val_ids = torch.as_tensor(encode(tok, read("val")))
        block = GPT["train"]["block_size"]
        scores = evaluate_windows(lm.model.float(), val_ids, block=block, stride=block // 2)
        row = {"kind": "gpt", "params": summary["params"], "steps": summary["steps"], "tokens_seen": summary["tokens"],
               "epochs": round(summary["tokens"] / max(len(encode(tok, read("train"))), 1), 3),
               "val_loss": scores["nll"], "val_tokens": scores["tokens"]}
    row.update(val_perplexity=math.exp(row["val_loss"]), train_wall_s=round(train_wall, 1),
               train_cpu_s=round(train_cpu, 1), eval_s=round(time.perf_counter() - wall, 1),
               load_at_start=load, load_at_end=os.getloadavg()[0])
    return row


def run_ngrams(orders: list[int], paths: dict[str, str]) -> list[dict]:
    from featherlm.model.baselines import KneserNeyLM
    from featherlm.tokenizer import Tokenizer
    from featherlm.train.pretrain import encode

    tok = Tokenizer.from_dir(paths["tokenizer"])
    train_ids = encode(tok, Path(paths["train"]).read_text(encoding="utf-8")).tolist()
    val_ids = encode(tok, Path(paths["val"]).read_text(encoding="utf-8")).tolist()
    rows = []
    for order in orders:
        cpu, wall = time.process_time(), time.perf_counter()
        lm = KneserNeyLM(order, vocab_size=tok.vocab_size).fit(train_ids)
        train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
        scores = lm.evaluate(val_ids)
        rows.append({"kind": "ngram", "order": order, "params": lm.num_ngrams(), "tokens_seen": len(train_ids),
                     "epochs": 1.0, "val_loss": scores["nll"], "val_perplexity": scores["perplexity"],
                     "val_tokens": scores["tokens"], "train_wall_s": round(train_wall, 1),
                     "train_cpu_s": round(train_cpu, 1)})
        print(f"{order}-gram KN: val perplexity {scores['perplexity']:.2f} ({train_wall:.0f} s)", file=sys.stderr)
    return rows


def prepare(out: Path, vocab_size: int) -> dict[str, str]:
    """train.txt, val.txt and the BPE tokenizer trained on train.txt, under ``out``."""
    from featherlm.tokenizer import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    train_text, val_text = split_text(DATA.read_text(encoding="utf-8"))
    paths = {"train": str(out / "train.txt"), "val": str(out / "val.txt"), "tokenizer": str(out / "tokenizer")}
    Path(paths["train"]).write_text(train_text, encoding="utf-8")
    Path(paths["val"]).write_text(val_text, encoding="utf-8")
    tok = train_tokenizer(paths["train"], "bpe", vocab_size, out=paths["tokenizer"])
    n_train = len(tok.encode(train_text, add_special_tokens=False))
    n_val = len(tok.encode(val_text, add_special_tokens=False))
    print(f"BPE {tok.vocab_size} ids: {len(train_text):,} / {len(val_text):,} characters -> {n_train:,} / "
          f"{n_val:,} tokens ({len(train_text) / n_train:.2f} characters per token)", file=sys.stderr)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training per network")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="what the budget counts: wall seconds, or CPU seconds of each network's process")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--kinds", default="ngram,lstm,gpt")
    parser.add_argument("--orders", default="2,3,4,5", help="n-gram orders to fit")
    parser.add_argument("--sequential", action="store_true", help="train the networks one after the other")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep the split and tokenizer here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    started, load = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(args.out or Path(tmp), args.vocab_size)
        rows = run_ngrams([int(o) for o in args.orders.split(",")], paths) if "ngram" in kinds else []
        networks = [k for k in ("lstm", "gpt") if k in kinds]
        if args.sequential or len(networks) < 2:
            rows += [run_network(k, args.budget, args.clock, paths, args.seed) for k in networks]
        else:
            with ProcessPoolExecutor(len(networks), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_network, k, args.budget, args.clock, paths, args.seed) for k in networks]
                rows += [f.result() for f in futures]
    result = {"budget": args.budget, "clock": args.clock, "vocab_size": args.vocab_size,
              "parallel": not args.sequential, "started": started, "load_before": load,
              "load_after": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"\nbudget {args.budget:.0f} {args.clock}-seconds per network, one thread each"
          f"{', both at once' if not args.sequential else ''}; started {started}; load average before "
          f"{load[0]:.2f}, after {result['load_after'][0]:.2f}\n")
    print("| model | parameters | steps | tokens seen (epochs) | training wall / CPU time | val perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = {"ngram": f"{r.get('order')}-gram Kneser-Ney", "lstm": "LSTM 2 x 256", "gpt": "GPT 4 x 128 (Llama)"}
        size = f"{r['params']:,} n-grams" if r["kind"] == "ngram" else f"{r['params']:,}"
        print(f"| {name[r['kind']]} | {size} | {r.get('steps', '-')} | {r['tokens_seen']:,} ({r['epochs']:.2f}) "
              f"| {r['train_wall_s']:.0f} s / {r['train_cpu_s']:.0f} s | **{r['val_perplexity']:.2f}** |")


if __name__ == "__main__":
    main()
