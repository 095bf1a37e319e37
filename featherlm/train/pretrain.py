"""Pretraining from scratch: one flat loop over random windows of a token stream.

    pretrain(config) -> summary
      read the corpus (a text file, or token shards) and the tokenizer; build the model and its heads
      AdamW with decay groups, warmup then cosine to min_lr
      for each step: draw the global batch (seeded), take this process's rows, accumulate micro-batches,
                     clip, step; log, estimate the validation loss, sample text, checkpoint `last`
      stop at max_steps, at the time budget, after stop_after steps, or at Ctrl-C (with a checkpoint)
      final validation loss, the model folder (featherlm.load reads it), curves.png, the summary

Unlike fine-tuning there are no epochs: each batch is ``batch_size`` windows at random offsets,
drawn from one seeded ``torch.Generator`` (as nanoGPT's ``get_batch``), and the masks of the
encoder objectives are drawn from it too. Resume restores that generator with the weights, the
optimizer moments and the RNG, so a resumed run continues the same loss curve exactly.

    run/
      config.yaml  metrics.jsonl  curves.png  summary.json
      tokenizer/   the tokenizer the ids come from (a char tokenizer is built from the training text)
      last/        trainer_state.safetensors (model, optimizer, RNG, data generator) + trainer_state.json
      model/       the trained model with its tokenizer: featherlm.load(run / "model")
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from featherlm.checkpoint import save_model
from featherlm.data.shards import MANIFEST, TokenShards, read_manifest
from featherlm.errors import CheckpointError, ConfigError, DataError
from featherlm.io import atomic_dir, atomic_write_text
from featherlm.model import Seq2SeqTransformer, Transformer, new_model
from featherlm.model.baselines import KneserNeyLM, RecurrentConfig, RecurrentLM
from featherlm.model.layers import NATIVE_BF16, Linear
from featherlm.tokenizer import Tokenizer, char_tokenizer, train_tokenizer
from featherlm.train import distributed as dp
from featherlm.train.masking import IGNORE_INDEX, mask_tokens, random_spans_mask, span_corrupt, span_counts
from featherlm.train.optim import make_adamw, warmup_cosine
from featherlm.train.plot import plot_curves
from featherlm.train.pretrain_config import (
    RECURRENT,
    TOKENIZER_KINDS,
    PretrainConfig,
    load_pretrain_config,
    save_pretrain_config,
)
from featherlm.train.run import METRICS, STATE_JSON, STATE_TENSORS, append_metrics, read_metrics, truncate_metrics
from featherlm.train.trainer import interruptible

CONFIG, PLOT, LAST, MODEL, TOKENIZER = "config.yaml", "curves.png", "last", "model", "tokenizer"
SUMMARY = "summary.json"
RUN_FILES = (CONFIG, METRICS, PLOT, LAST, MODEL, TOKENIZER, SUMMARY)
RESUMABLE_CHANGES = {"time_budget_s", "device", "threads", "fsdp", "sample_every", "sample_tokens", "sample_prompt"}
LN2 = math.log(2)
SAMPLE_TEMPERATURE = 0.8  # a little below 1: fewer rare-token derailments in a short sample (nanoGPT's default)
# Dense bf16 tensor-core peak FLOP/s by device name, for model FLOPs utilisation (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


@dataclass
class PretrainState:
    """The loop's counters; with weights, optimizer, RNG and data generator all that resume needs."""

    step: int = 0
    tokens: int = 0  # input tokens trained on, all processes together
    window_loss: float = 0.0  # training loss summed since the last log line, so a resumed run logs
    window_steps: int = 0  # the same averages as an uninterrupted one
    train_time_s: float = 0.0  # seconds spent in training steps, all invocations together
    elapsed_s: float = 0.0  # train.clock seconds of the run, all invocations together (time budget and schedule)


def pretrain(config: PretrainConfig | Mapping[str, Any] | str | Path, *,
             overrides: Sequence[str] | Mapping[str, Any] = (), resume: bool = False,
             stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a model from scratch as ``config`` (a PretrainConfig, a dict or a YAML path) says.

    ``overrides``: dotted settings on top (``["--train.lr", "1e-3"]``). ``resume``: continue the
    run in ``out.dir`` from its ``last`` checkpoint. ``stop_after``: stop once this many steps are
    done (with a checkpoint; resume continues, the schedule unchanged). Under ``torchrun`` every
    process calls this; rank 0 alone writes. Returns the summary (see ``summarize``).
    """
    cfg = load_pretrain_config(config, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dist = dp.setup(cfg.train.device)
    try:
        if cfg.model.arch == "ngram":
            return fit_ngram(cfg, dist, progress)
        return train_loop(cfg, dist, resume=resume, stop_after=stop_after, progress=progress)
    finally:
        dp.teardown(dist)


def train_loop(cfg: PretrainConfig, dist: dp.Dist, *, resume: bool, stop_after: int | None,
               progress: bool) -> dict[str, Any]:
    t, run_dir, started = cfg.train, Path(cfg.out.dir), time.perf_counter()
    clock = time.process_time if t.clock == "cpu" else time.perf_counter  # what the time budget counts
    clock_started = clock()
    say = functools.partial(print, file=sys.stderr) if progress and dist.main else (lambda *a, **k: None)

    # ---- corpus, tokenizer, model; nothing is written until every check has passed
    prepare_run_dir(run_dir, cfg, resume, dist)
    corpus = load_corpus(cfg, run_dir / TOKENIZER if resume else None)
    tokenizer, specials = corpus.tokenizer, special_ids(corpus.tokenizer, cfg, corpus.vocab_size)
    if t.batch_size % (dist.world * t.grad_accum):
        raise ConfigError(f"train.batch_size {t.batch_size} must split evenly into {dist.world} processes x "
                          f"{t.grad_accum} micro-batches (train.grad_accum)")
    torch.manual_seed(t.seed)  # the initial weights
    model = build_model(cfg, corpus.vocab_size, specials).to(dist.device)
    n_params = sum(p.numel() for p in model.parameters())
    model_dp = dp.wrap(model, dist, fsdp=t.fsdp, blocks=transformer_blocks(model))
    optimizer = make_adamw(model_dp, t.lr, t.weight_decay, t.betas)  # after wrapping: FSDP swaps parameters
    gen = torch.Generator().manual_seed(t.seed)  # windows and masks of the training batches
    state = PretrainState()
    if resume:
        state = restore_checkpoint(run_dir / LAST, model_dp, optimizer, gen, dist)
        if dist.main:
            truncate_metrics(run_dir / METRICS, state.step)
    elif dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG, save_pretrain_config(cfg))
        tokenizer.save(run_dir / TOKENIZER)
        (run_dir / METRICS).write_text("")
    dp.barrier(dist)
    say(f"{cfg.model.arch} ({cfg.objective.kind}): {n_params:,} parameters; {corpus.train.num_tokens:,} train / "
        f"{corpus.val.num_tokens:,} val tokens; vocabulary {corpus.vocab_size}; {dist.world} process(es) on "
        f"{dist.device.type}")

    use_bf16 = t.bf16 if isinstance(t.bf16, bool) else bf16_is_fast(dist.device)
    if dist.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32 (as nanoGPT)
    per_rank = t.batch_size // dist.world
    tokens_per_step = t.batch_size * t.block_size
    flops_per_token = model_flops_per_token(model, cfg)
    peak = peak_flops(dist.device)
    stop_reason, start_step, start_train_time, start_elapsed = None, state.step, state.train_time_s, state.elapsed_s
    last_eval: dict[str, Any] | None = None
    bar = tqdm(total=t.max_steps, initial=state.step, disable=not (progress and dist.main), desc="pretrain",
               unit="step", dynamic_ncols=True)
    model_dp.train()
    with interruptible() as interrupt:
        while state.step < t.max_steps and stop_reason is None:
            # ---- one optimizer step: the global batch, this process's rows, grad_accum micro-batches
            tick = time.perf_counter()
            progress = state.elapsed_s / t.time_budget_s if t.schedule == "time" else None
            lr = warmup_cosine(state.step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.max_steps,
                               progress=progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch, counts = draw_batch(corpus.train, cfg, specials, gen)
            rows = {k: v[dist.rank * per_rank:(dist.rank + 1) * per_rank] for k, v in batch.items()}
            step_loss = 0.0
            for i in range(t.grad_accum):
                micro = {k: v.chunk(t.grad_accum)[i].to(dist.device, non_blocking=True) for k, v in rows.items()}
                with dp.gradient_sync(model_dp, sync=i == t.grad_accum - 1):
                    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        sums = model_dp(**micro)
                    # sums over this micro-batch / the global batch's count: summed over micro-batches and
                    # processes this is the global mean; x world because DDP/FSDP average the gradients
                    loss = sum(sums[k] / max(counts[k], 1) for k in sums)
                    (loss * dist.world).backward()
                step_loss += float(loss.detach())
            norm = torch.nn.utils.clip_grad_norm_(model_dp.parameters(), t.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += tokens_per_step
            # one collective for the step's loss, the stop request and the clock (averaged over the
            # processes), so every process sets the same lr and takes the same decisions
            elapsed = start_elapsed + clock() - clock_started
            step_loss, interrupted, elapsed = dp.all_sum([step_loss, interrupt["requested"], elapsed], dist)
            state.elapsed_s = elapsed / dist.world
            state.window_loss += step_loss
            state.window_steps += 1
            state.train_time_s += time.perf_counter() - tick
            bar.update(1)

            # ---- logging
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                speed = (state.step - start_step) * tokens_per_step / max(state.train_time_s - start_train_time, 1e-9)
                record = {"step": state.step, "split": "train", "loss": state.window_loss / state.window_steps,
                          "lr": lr, "grad_norm": dp.grad_norm_value(norm), "tokens": state.tokens,
                          "tokens_per_s": round(speed, 1), "time_s": round(time.perf_counter() - started, 3)}
                if peak:
                    record["mfu"] = round(flops_per_token * speed / (peak * dist.world), 4)
                if dist.main:
                    append_metrics(run_dir / METRICS, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
                state.window_loss, state.window_steps = 0.0, 0

            # ---- stop? (one decision for every process)
            if stop_after is not None and state.step >= stop_after:
                stop_reason = "stop_after"
            elif interrupted:
                stop_reason = "interrupted"
            elif t.time_budget_s and state.elapsed_s >= t.time_budget_s:
                stop_reason = "time_budget"

            # ---- validation estimate, text sample, `last` checkpoint
            end = state.step == t.max_steps or stop_reason is not None
            if (t.eval_every and state.step % t.eval_every == 0) or end:
                last_eval = estimate_val_loss(model_dp, corpus.val, cfg, specials, dist, use_bf16)
                last_eval["time_s"] = round(time.perf_counter() - started, 3)
                if dist.main:
                    append_metrics(run_dir / METRICS, {"step": state.step, "split": "eval", **last_eval})
                    bar.write(f"step {state.step}: val loss {last_eval['loss']:.4f} "
                              f"({last_eval['bits_per_token']:.3f} bits/token)", file=sys.stderr)
            if cfg.is_decoder and t.sample_every and (state.step % t.sample_every == 0 or end):
                text = sample_text(model_dp, tokenizer, t, seed=t.seed + state.step, device=dist.device)
                if dist.main:
                    append_metrics(run_dir / METRICS, {"step": state.step, "split": "sample", "text": text})
                    bar.write(f"--- sample at step {state.step} ---\n{text}\n---", file=sys.stderr)
            if (t.eval_every and state.step % t.eval_every == 0) or end:
                save_checkpoint(run_dir / LAST, model_dp, optimizer, gen, state, dist)
    bar.close()

    # ---- the model folder, plot, summary
    if last_eval is None:  # nothing trained in this call (resuming a finished run): evaluate what is there
        last_eval = estimate_val_loss(model_dp, corpus.val, cfg, specials, dist, use_bf16)
    save_final_model(model_dp, optimizer, model, tokenizer, run_dir / MODEL, dist)
    records = read_metrics(run_dir / METRICS)
    if cfg.out.plot and dist.main:
        plot_curves(records, run_dir / PLOT, "loss")
    trains = [r for r in records if r.get("split") == "train"]
    run_tokens = (state.step - start_step) * tokens_per_step
    run_time = state.train_time_s - start_train_time
    summary = {
        "run_dir": str(run_dir), "arch": cfg.model.arch, "objective": cfg.objective.kind,
        "val_loss": last_eval["loss"], "val_bits_per_token": last_eval["bits_per_token"],
        "val_perplexity": last_eval["perplexity"], "train_loss": trains[-1]["loss"] if trains else None,
        "steps": state.step, "max_steps": t.max_steps, "finished": state.step >= t.max_steps,
        "stopped": stop_reason, "tokens": state.tokens, "tokens_per_s": round(run_tokens / max(run_time, 1e-9), 1),
        "time_s": round(time.perf_counter() - started, 3), "train_time_s": round(state.train_time_s, 3),
        "elapsed_s": round(state.elapsed_s, 3), "clock": t.clock,
        "params": n_params, "vocab_size": corpus.vocab_size, "processes": dist.world, "device": dist.device.type,
        "bf16": use_bf16,
    }
    if peak:
        summary["mfu"] = round(flops_per_token * summary["tokens_per_s"] / (peak * dist.world), 4)
    if dist.main:
        atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    if stop_reason in ("stop_after", "interrupted", "time_budget"):
        say(f"stopped ({stop_reason}) at step {state.step} of {t.max_steps}; continue with --resume")
    return summary


# ----------------------------------------------------------------------------- corpus and tokenizer


class TokenArray:
    """Token ids held in memory, read like ``TokenShards``: ``num_tokens`` and ``get(start, length)``."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.num_tokens = len(self.ids)

    def get(self, start: int, length: int) -> np.ndarray:
        return self.ids[start:start + length]


class TokenSlice:
    """Tokens ``[start, stop)`` of another stream (the validation tail of shards without a val split)."""

    def __init__(self, stream: Any, start: int, stop: int) -> None:
        self.stream, self.start, self.num_tokens = stream, start, stop - start

    def get(self, start: int, length: int) -> np.ndarray:
        return self.stream.get(self.start + start, length)


@dataclass
class Corpus:
    train: Any  # TokenArray, TokenShards or TokenSlice
    val: Any
    tokenizer: Tokenizer
    vocab_size: int


def load_corpus(cfg: PretrainConfig, saved_tokenizer: Path | None = None) -> Corpus:
    """Training and validation token streams with their tokenizer.

    ``data.train`` is a text file (split by ``data.val_ratio`` unless ``data.val`` is given) or a
    shard folder (its "val" split, ``data.val``, or its last ``val_ratio``). The tokenizer: the
    one a resumed run saved, a folder named by ``data.tokenizer``, the shards' own, or for a kind
    (auto/char, bpe, wordpiece, unigram) one trained on the training text (see ``build_tokenizer``).
    """
    d, train_path = cfg.data, Path(cfg.data.train)
    if not train_path.exists():
        raise DataError(train_path, None, "no such file or folder")
    if train_path.is_dir():
        manifest = read_manifest(train_path)
        if saved_tokenizer is not None:
            tokenizer = Tokenizer.from_dir(saved_tokenizer)
        elif d.tokenizer in ("auto", "char"):  # the ids were made by the shards' own tokenizer
            tokenizer = shard_tokenizer(train_path, manifest)
        elif d.tokenizer in TOKENIZER_KINDS:
            raise ConfigError(f"data.tokenizer {d.tokenizer}: shards were tokenised already; give the tokenizer "
                              "folder they were made with, or leave data.tokenizer as auto")
        else:
            tokenizer = Tokenizer.from_dir(Path(d.tokenizer))
        train = TokenShards(train_path, "train")
        if d.val:
            val = TokenShards(d.val, "val")
        elif "val" in manifest["splits"] and manifest["splits"]["val"].get("tokens", 0):
            val = TokenShards(train_path, "val")
        else:
            cut = int(train.num_tokens * (1 - d.val_ratio))
            train, val = TokenSlice(train, 0, cut), TokenSlice(train, cut, train.num_tokens)
        vocab = max(int(manifest["vocab_size"]), tokenizer.vocab_size)
    else:
        text = read_text(train_path)
        if d.val:
            train_text, val_text = text, read_text(Path(d.val))
        else:
            cut = int(len(text) * (1 - d.val_ratio))  # by characters, as nanoGPT's prepare.py
            train_text, val_text = text[:cut], text[cut:]
        if saved_tokenizer is not None:
            tokenizer = Tokenizer.from_dir(saved_tokenizer)
        elif d.tokenizer in TOKENIZER_KINDS:
            tokenizer = build_tokenizer(train_text, cfg)
        else:
            tokenizer = Tokenizer.from_dir(Path(d.tokenizer))
        train, val = TokenArray(encode(tokenizer, train_text)), TokenArray(encode(tokenizer, val_text))
        vocab = tokenizer.vocab_size
    need = cfg.train.block_size + 1
    for name, stream in (("training", train), ("validation", val)):
        if stream.num_tokens < need:
            raise DataError(train_path if name == "training" else (d.val or train_path), None,
                            f"{name} data holds {stream.num_tokens} tokens; one window of train.block_size + 1 "
                            f"needs {need} (lower train.block_size or data.val_ratio)")
    return Corpus(train, val, tokenizer, vocab)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise DataError(path, None, "a folder, expected a text file") from None


def encode(tokenizer: Tokenizer, text: str, chunk_chars: int = 1 << 16) -> np.ndarray:
    """All ids of ``text``, no special tokens added; encoded in pieces cut after newlines (in parallel
    by the Rust tokenizer) so a large file does not become one giant string in the tokenizer."""
    pieces, start = [], 0
    while start < len(text):
        stop = text.find("\n", start + chunk_chars)
        stop = len(text) if stop < 0 else stop + 1
        pieces.append(text[start:stop])
        start = stop
    ids = tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []
    return np.fromiter((i for piece in ids for i in piece), dtype=np.int64)


def build_tokenizer(text: str, cfg: PretrainConfig) -> Tokenizer:
    """A tokenizer trained on the training text: one id per character ("auto", "char"), or BPE,
    WordPiece, Unigram of ``data.vocab_size`` (``featherlm.tokenizer.train_tokenizer``). T5 gets
    sentinel tokens; an encoder's ``encode`` wraps texts in its [CLS] ... [SEP] (bos/eos) so that
    fine-tuning sees inputs shaped like those of pretraining."""
    from tokenizers import processors

    kind = "char" if cfg.data.tokenizer == "auto" else cfg.data.tokenizer
    extra = [f"<extra_id_{i}>" for i in range(100)] if cfg.objective.kind == "span" else []
    if kind == "char":
        tok = char_tokenizer([text], vocab_size=cfg.data.vocab_size or None, special_tokens=extra)
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the trainer reads files: the training split only
            path = Path(tmp) / "train.txt"
            path.write_text(text, encoding="utf-8")
            tok = train_tokenizer(path, kind, cfg.data.vocab_size, special_tokens=extra)
    if cfg.objective.kind == "mlm" and tok.encode("a")[:1] != [tok.bos_id]:
        bos, eos = tok.bos_token, tok.eos_token
        tok.backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
            special_tokens=[(bos, tok.bos_id), (eos, tok.eos_id)])
    return tok


def shard_tokenizer(data_dir: Path, manifest: dict[str, Any]) -> Tokenizer:
    """The shards' tokenizer: the copy saved with them (``tokenizer_dir``, as ``featherlm data prepare``
    writes), else the folder the manifest names (relative to the shards or the working directory)."""
    name = manifest.get("tokenizer")
    candidates = [data_dir / str(manifest.get("tokenizer_dir") or TOKENIZER)]
    if name not in (None, "char"):
        candidates += [data_dir / str(name), Path(str(name))]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_dir(folder)
    raise ConfigError(f"{data_dir / MANIFEST}: cannot find the shards' tokenizer ({name!r}); "
                      "give its folder as data.tokenizer")


@dataclass
class Specials:
    """Token ids the objectives need: masking never touches ``never_mask``; random replacements
    come from the other ids below ``vocab_size``."""

    vocab_size: int
    mask: int | None = None
    pad: int | None = None
    cls: int | None = None
    sep: int | None = None
    eos: int | None = None
    never_mask: list[int] = field(default_factory=list)
    sentinels: list[int] = field(default_factory=list)


def special_ids(tokenizer: Tokenizer, cfg: PretrainConfig, vocab_size: int) -> Specials:
    """The special ids of ``tokenizer`` for the objective; ConfigError when one it needs is missing."""
    config = tokenizer.config
    cls = tokenizer.token_to_id(config["cls_token"]) if config.get("cls_token") else tokenizer.bos_id
    sep = tokenizer.token_to_id(config["sep_token"]) if config.get("sep_token") else tokenizer.eos_id
    added = [i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special]
    never = sorted({*added, *(i for i in (cls, sep, tokenizer.pad_id, tokenizer.mask_id) if i is not None)})
    specials = Specials(vocab_size, tokenizer.mask_id, tokenizer.pad_id, cls, sep, tokenizer.eos_id, never)
    if cfg.objective.kind == "mlm" and None in (specials.mask, cls, sep):
        raise ConfigError(f"objective mlm needs mask, [CLS]/bos and [SEP]/eos tokens; the tokenizer "
                          f"({tokenizer.source}) has mask {specials.mask}, cls {cls}, sep {sep}")
    if cfg.objective.kind == "span":
        specials.sentinels = [i for i in (tokenizer.token_to_id(f"<extra_id_{k}>") for k in range(1000))
                              if i is not None]
        if not specials.sentinels:
            raise ConfigError(f"objective span needs sentinel tokens <extra_id_0>, <extra_id_1>...; the tokenizer "
                              f"({tokenizer.source}) has none")
    return specials


# ----------------------------------------------------------------------------- batches


def span_window(block_size: int, noise_density: float, mean_span: float) -> int:
    """The longest raw window whose span-corrupted input (spans -> sentinels, plus eos) fits block_size."""
    def input_length(n: int) -> int:
        noisy, spans = span_counts(n, noise_density, mean_span)
        return n - noisy + spans + 1

    raw = block_size - 1
    while input_length(raw + 1) <= block_size:
        raw += 1
    return raw


def windows(stream: Any, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows of ``length`` consecutive ids from each start: (len(starts), length) int64."""
    if isinstance(stream, TokenArray):
        index = starts.numpy()[:, None] + np.arange(length)
        return torch.from_numpy(stream.ids[index])
    return torch.from_numpy(np.stack([stream.get(int(s), length) for s in starts]))


def draw_batch(stream: Any, cfg: PretrainConfig, specials: Specials,
               gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The global batch of the objective, drawn with ``gen``, and its loss-term counts.

    causal: ``block_size + 1`` ids per row, inputs and next-token labels. mlm: [CLS] window [SEP]
    (with nsp: [CLS] A [SEP] B [SEP], B the true continuation of A or a random window, half and
    half), masked 80/10/10. span: T5's span corruption of a raw window into sentinel-marked inputs
    of at most ``block_size`` and the spans as targets. Every process draws the same batch and
    keeps its own rows.
    """
    t, kind = cfg.train, cfg.objective.kind
    B, T = t.batch_size, t.block_size
    if kind == "causal":
        ids = windows(stream, torch.randint(stream.num_tokens - T, (B,), generator=gen), T + 1)  # (B, T+1)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, {"lm": B * T}
    cls = torch.full((B, 1), specials.cls)
    sep = torch.full((B, 1), specials.sep)
    if kind == "mlm" and not cfg.objective.nsp:
        body = windows(stream, torch.randint(stream.num_tokens - T + 3, (B,), generator=gen), T - 2)
        ids, types, extra = torch.cat([cls, body, sep], 1), torch.zeros(B, T, dtype=torch.long), {}
    elif kind == "mlm":
        n_a = (T - 3) // 2
        n_b = T - 3 - n_a
        start_a = torch.randint(stream.num_tokens - n_a - n_b + 1, (B,), generator=gen)
        is_random = torch.rand(B, generator=gen) < 0.5
        start_b = torch.where(is_random, torch.randint(stream.num_tokens - n_b + 1, (B,), generator=gen),
                              start_a + n_a)
        a, b = windows(stream, start_a, n_a), windows(stream, start_b, n_b)
        ids = torch.cat([cls, a, sep, b, sep], 1)  # (B, T)
        types = torch.cat([torch.zeros(B, n_a + 2, dtype=torch.long), torch.ones(B, n_b + 1, dtype=torch.long)], 1)
        extra = {"nsp_labels": is_random.long()}  # 0: B follows A, 1: B is random (BERT's convention)
    else:  # span corruption: raw windows long enough that the corrupted inputs fill block_size
        raw = span_window(T, cfg.objective.noise_density, cfg.objective.mean_span)
        rows = windows(stream, torch.randint(stream.num_tokens - raw + 1, (B,), generator=gen), raw)
        pairs = [span_corrupt(row, random_spans_mask(raw, cfg.objective.noise_density, cfg.objective.mean_span, gen),
                              specials.sentinels, specials.eos) for row in rows]
        inputs, labels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (B, <=T), (B, L)
        return {"input_ids": inputs, "labels": labels}, {"lm": labels.numel()}
    inputs, labels = mask_tokens(ids, mask_id=specials.mask, vocab_size=specials.vocab_size,
                                 special_ids=specials.never_mask, mask_prob=cfg.objective.mask_prob, generator=gen)
    counts = {"lm": int((labels != IGNORE_INDEX).sum()), **({"nsp": B} if extra else {})}
    return {"input_ids": inputs, "labels": labels, "token_type_ids": types, **extra}, counts


# ----------------------------------------------------------------------------- model


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm, then the (tied) embedding matrix plus a bias."""

    def __init__(self, d_model: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(hidden)))  # (N, C)
        return F.linear(x, embedding, self.bias)  # (N, V)


class PretrainModel(nn.Module):
    """The model being pretrained plus the heads only pretraining uses (MLM, NSP).

    ``forward(**batch)`` returns the *summed* losses of the batch by name ("lm", "nsp"), so the loop
    divides each by the count of the whole global batch; without labels it returns next-token
    ``logits`` (sampling). Calling the wrapper (not ``backbone``) keeps DDP/FSDP hooks in play.
    """

    def __init__(self, backbone: nn.Module, objective: str, nsp: bool = False) -> None:
        super().__init__()
        self.backbone, self.objective = backbone, objective
        if objective == "mlm":
            c = backbone.config
            self.mlm_head = MaskedLMHead(c.d_model, c.vocab_size, c.norm_eps)
            nn.init.normal_(self.mlm_head.dense.weight, std=c.initializer_range)
            nn.init.zeros_(self.mlm_head.dense.bias)
            if nsp:
                self.nsp_head = Linear(c.d_model, 2)
                nn.init.normal_(self.nsp_head.weight, std=c.initializer_range)
                nn.init.zeros_(self.nsp_head.bias)
            else:  # the pooler only serves NSP; frozen, it is left out of DDP's gradient reduction
                backbone.pooler.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.objective == "causal":
            kwargs = {"last_only": True} if labels is None and isinstance(self.backbone, Transformer) else {}
            logits = self.backbone(input_ids, **kwargs).logits  # (B, T, V)
            if labels is None:
                return {"logits": logits}
            return {"lm": F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")}
        if self.objective == "span":  # teacher forcing: the decoder reads the targets shifted right
            decoder_input_ids = self.backbone.shift_right(labels)
            logits = self.backbone(input_ids, decoder_input_ids=decoder_input_ids).logits  # (B, L, V)
            return {"lm": F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")}
        out = self.backbone(input_ids, token_type_ids=token_type_ids)
        chosen = labels != IGNORE_INDEX  # (B, T)
        logits = self.mlm_head(out.hidden[chosen], self.backbone.embed_tokens.weight)  # (N, V)
        losses = {"lm": F.cross_entropy(logits.float(), labels[chosen], reduction="sum")}
        if nsp_labels is not None:
            losses["nsp"] = F.cross_entropy(self.nsp_head(out.pooled).float(), nsp_labels, reduction="sum")
        return losses


def build_model(cfg: PretrainConfig, vocab_size: int, specials: Specials) -> PretrainModel:
    """A freshly initialised model of ``model.arch`` wrapped with the objective's heads."""
    m = cfg.model
    if m.arch in RECURRENT:
        backbone: nn.Module = RecurrentLM(RecurrentConfig(vocab_size, m.d_model, m.n_layer, m.arch, m.dropout))
    elif m.arch == "t5":  # T5 starts decoding from the pad id
        backbone = new_model(cfg.model_config(vocab_size, pad_token_id=specials.pad, eos_token_id=specials.eos,
                                              decoder_start_token_id=specials.pad))
    else:
        backbone = Transformer(cfg.model_config(vocab_size, pad_token_id=None if cfg.is_decoder else specials.pad,
                                                eos_token_id=specials.eos))
    return PretrainModel(backbone, cfg.objective.kind, cfg.objective.nsp)


def transformer_blocks(model: PretrainModel) -> list[nn.Module]:
    """FSDP's shard units: each block, then the backbone (embeddings, final norm) as its own unit; a
    T5's two stacks share their embedding table, which therefore stays with the root."""
    backbone = model.backbone
    if isinstance(backbone, Seq2SeqTransformer):
        return [*backbone.encoder.layers, *backbone.decoder.layers]
    return [*backbone.layers, backbone] if isinstance(backbone, Transformer) else []


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays on GPUs that have bf16 and on CPUs with native bf16; elsewhere it is
    emulated and slower than fp32 (see featherlm.model.layers)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return NATIVE_BF16


def model_flops_per_token(model: PretrainModel, cfg: PretrainConfig) -> float:
    """Training FLOPs per token as in the PaLM appendix / nanoGPT: 6 N (forward + backward of
    every matmul weight) + 12 L C T for attention scores and values (positions tables excluded)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_positions" not in name)
    attention = 12 * cfg.model.n_layer * cfg.model.d_model * cfg.train.block_size if cfg.is_transformer else 0
    return 6 * n + attention


def peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of a known GPU (None on CPU or an unknown device)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- evaluation and samples


@torch.no_grad()
def estimate_val_loss(model: nn.Module, stream: Any, cfg: PretrainConfig, specials: Specials, dist: dp.Dist,
                      bf16: bool) -> dict[str, Any]:
    """Mean validation loss (nats per predicted token) over ``eval_iters`` global batches, the same
    windows (and masks) at every call, so successive estimates differ by the model only."""
    t = cfg.train
    gen = torch.Generator().manual_seed(t.seed + 1_000_003)
    per_rank = t.batch_size // dist.world
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    totals: dict[str, int] = {}
    try:
        for _ in range(t.eval_iters):
            batch, counts = draw_batch(stream, cfg, specials, gen)
            rows = {k: v[dist.rank * per_rank:(dist.rank + 1) * per_rank].to(dist.device) for k, v in batch.items()}
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(**rows)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                totals[k] = totals.get(k, 0) + counts[k]
    finally:
        model.train(was_training)
    keys = sorted(sums)
    summed = dict(zip(keys, dp.all_sum([sums[k] for k in keys], dist), strict=True))
    loss = summed["lm"] / max(totals["lm"], 1)
    result = {"loss": loss, "bits_per_token": loss / LN2, "perplexity": math.exp(min(loss, 700.0)),
              "tokens": totals["lm"]}
    if "nsp" in summed:
        result["nsp_loss"] = summed["nsp"] / max(totals["nsp"], 1)
    return result


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer: Tokenizer, t: Any, *, seed: int, device: torch.device) -> str:
    """``sample_tokens`` tokens after ``sample_prompt``, sampled at temperature 0.8 from the last
    ``block_size`` tokens; its own generator, so sampling leaves the training RNG untouched."""
    prompt = tokenizer.encode(t.sample_prompt, add_special_tokens=False) or [tokenizer.eos_id or 0]
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([prompt], device=device)  # (1, P)
    was_training = model.training
    model.eval()
    try:
        for _ in range(t.sample_tokens):
            logits = model(input_ids=x[:, -t.block_size:])["logits"][:, -1].float()  # (1, V)
            probs = (logits / SAMPLE_TEMPERATURE).softmax(-1)
            x = torch.cat([x, torch.multinomial(probs, 1, generator=gen)], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(x[0, len(prompt):].tolist())


# ----------------------------------------------------------------------------- run dir and checkpoints


def prepare_run_dir(run_dir: Path, cfg: PretrainConfig, resume: bool, dist: dp.Dist) -> None:
    """Check the run dir fits the request before anything is written; clear it when overwriting."""
    if resume:
        if not (run_dir / LAST / STATE_JSON).is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no {LAST}/ checkpoint)")
        saved, now = load_pretrain_config(run_dir / CONFIG).to_dict(), cfg.to_dict()
        diff = sorted(f"{s}.{k}" for s in saved if s != "out" for k in saved[s]
                      if saved[s][k] != now[s].get(k) and not (s == "train" and k in RESUMABLE_CHANGES))
        if diff:
            raise ConfigError(f"cannot resume {run_dir}: the config differs in {', '.join(diff)}")
        return
    if run_dir.exists() and any((run_dir / name).exists() for name in RUN_FILES):
        if not cfg.out.overwrite:
            raise ConfigError(f"{run_dir} already holds a run: resume it (--resume), choose another out.dir, "
                              "or set out.overwrite")
        if dist.main:
            for name in RUN_FILES:  # only what a run writes: never anything else the user keeps there
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    dp.barrier(dist)


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                    state: PretrainState, dist: dp.Dist) -> None:
    """Write ``last/`` atomically: weights and AdamW moments by parameter name, RNG and data generator
    states (safetensors), the counters (JSON). A collective under FSDP; rank 0 writes."""
    model_state, optim_state = dp.full_state(model, optimizer)
    if dist.main:
        tensors = {f"model.{k}": v for k, v in model_state.items()}
        scalars = {}
        for name, entry in optim_state.items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{name}.{key}"] = value
                else:
                    scalars[f"{name}.{key}"] = value
        tensors["rng.torch"], tensors["rng.data"] = torch.get_rng_state(), gen.get_state()
        if dist.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(dist.device)
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # tied weights: no sharing
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"producer": "featherlm"})
            data = {**asdict(state), "optimizer_scalars": scalars}
            (tmp / STATE_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    dp.barrier(dist)


def restore_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                       dist: dp.Dist) -> PretrainState:
    """Load what ``save_checkpoint`` wrote into a freshly built model and optimizer; return the counters."""
    try:
        data = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise CheckpointError(folder, f"unreadable trainer state ({e})") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_state: dict[str, dict[str, Any]] = {}
    items = [(k[len("optimizer."):], v) for k, v in tensors.items() if k.startswith("optimizer.")]
    for key, value in [*items, *data.pop("optimizer_scalars", {}).items()]:
        name, field_name = key.rsplit(".", 1)
        optim_state.setdefault(name, {})[field_name] = value
    try:
        dp.load_full_state(model, optimizer, model_state, optim_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(folder, f"checkpoint does not fit the model ({str(e).splitlines()[0]})") from None
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and dist.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], dist.device)
    return PretrainState(**data)


def save_final_model(model_dp: nn.Module, optimizer: torch.optim.Optimizer, model: PretrainModel,
                     tokenizer: Tokenizer, folder: Path, dist: dp.Dist) -> None:
    """``run/model``: the backbone without the pretraining heads, with its tokenizer. A transformer is
    a featherlm folder (``featherlm.load``, ``featherlm finetune --model``); a recurrent LM is written
    by ``RecurrentLM.save``. Built from the full state on CPU, so FSDP shards and GPU tensors alike work."""
    model_state, _ = dp.full_state(model_dp, optimizer)
    if dist.main:
        backbone = model.backbone
        copy = type(backbone)(backbone.config)
        copy.load_state_dict({k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")})
        if isinstance(copy, RecurrentLM):
            copy.save(folder)
            tokenizer.save(folder)
        else:
            save_model(copy.eval(), tokenizer, folder)
    dp.barrier(dist)


# ----------------------------------------------------------------------------- n-gram baseline


def fit_ngram(cfg: PretrainConfig, dist: dp.Dist, progress: bool) -> dict[str, Any]:
    """The Kneser-Ney n-gram baseline: count the training ids, score the validation ids (no loop)."""
    if dist.world > 1:
        raise ConfigError("model.arch ngram counts on one process; run it without torchrun")
    run_dir, started = Path(cfg.out.dir), time.perf_counter()
    prepare_run_dir(run_dir, cfg, False, dist)
    corpus = load_corpus(cfg)
    train_ids = corpus.train.get(0, corpus.train.num_tokens)
    val_ids = corpus.val.get(0, corpus.val.num_tokens)
    if progress:
        print(f"ngram: counting {cfg.model.order}-grams of {len(train_ids):,} tokens", file=sys.stderr)
    lm = KneserNeyLM(cfg.model.order, vocab_size=corpus.vocab_size).fit(train_ids)
    fit_s = time.perf_counter() - started
    scores = lm.evaluate(val_ids)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, save_pretrain_config(cfg))
    corpus.tokenizer.save(run_dir / TOKENIZER)
    with atomic_dir(run_dir / MODEL) as tmp:
        lm.save(tmp / "ngram.json")
        corpus.tokenizer.save(tmp)
    record = {"step": 0, "split": "eval", "loss": scores["nll"], "bits_per_token": scores["bits_per_token"],
              "perplexity": scores["perplexity"], "tokens": scores["tokens"]}
    (run_dir / METRICS).write_text(json.dumps(record) + "\n")
    summary = {
        "run_dir": str(run_dir), "arch": "ngram", "objective": "causal", "order": cfg.model.order,
        "val_loss": scores["nll"], "val_bits_per_token": scores["bits_per_token"],
        "val_perplexity": scores["perplexity"], "train_loss": None, "steps": 0, "tokens": len(train_ids),
        "tokens_per_s": round(len(train_ids) / max(fit_s, 1e-9), 1),
        "time_s": round(time.perf_counter() - started, 3), "ngrams": lm.num_ngrams(),
        "vocab_size": corpus.vocab_size, "finished": True, "stopped": None,
    }
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
