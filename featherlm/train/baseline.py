"""Training the classic baselines: n-gram / RNN / LSTM / GRU language models and TextCNN / BiLSTM
classifiers, on the same data and tokenizer as the transformers they are compared with.

Language models train for a wall-clock budget, not a step count, so that "equal time" comparisons
are what the numbers mean. The recurrent ones use truncated backpropagation through time over
contiguous text (Zaremba et al. 2014): the training ids are cut into ``batch_size`` parallel
streams, each read front to back in windows of ``seq_len`` tokens, with the recurrent state carried
(detached) from one window to the next; AdamW, gradient clipping and a cosine learning-rate decay
over the time budget. Validation reads the whole validation text as one stream with the state
carried, so every token after the first is scored with all the text before it.

    from featherlm.train.baseline import train_lm_baseline
    result = train_lm_baseline("lstm", train_ids, val_ids, vocab_size=65, time_budget_s=120)
    result["val_bits_per_token"]
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from featherlm.data import batch_order, collate, read_classification
from featherlm.data.tasks import encode_classification
from featherlm.errors import ConfigError, DataError
from featherlm.evaluate.metrics import classification_metrics
from featherlm.model.baselines import BiLSTMClassifier, KneserNeyLM, RecurrentConfig, RecurrentLM, TextCNN
from featherlm.model.baselines.recurrent import detach_state
from featherlm.tokenizer import Tokenizer, char_tokenizer

LM_KINDS = ("ngram", "rnn", "lstm", "gru")
CLASSIFIER_KINDS = ("textcnn", "bilstm")
LN2 = math.log(2)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clock_fn(clock: str) -> Callable[[], float]:
    """What a time budget counts: ``wall`` seconds, or ``cpu`` seconds of this process (all its threads).
    On a shared machine, with one torch thread, CPU seconds are the same compute whatever else runs,
    so models trained one after the other get equal budgets even when the load changes."""
    if clock not in CLOCKS:
        raise ConfigError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    return CLOCKS[clock]


# ----------------------------------------------------------------------------- text and tokens


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(text) < 2:
        raise DataError(path, None, "the file holds no text to train on")
    return text


def encode_text(text: str, tokenizer: str | Path | Tokenizer = "char") -> tuple[list[int], int, Callable, Tokenizer]:
    """(ids, vocab size, decode function, tokenizer) of ``text``.

    ``"char"``: featherlm's character tokenizer over the characters of the whole text (as nanoGPT's
    Shakespeare recipe builds its vocabulary; the ids are those of ``featherlm pretrain`` with a char
    tokenizer: its few special tokens first, never used by the text); otherwise a tokenizer folder
    (``tokenizer.json``), a model name, or a Tokenizer.
    """
    tok = char_tokenizer([text]) if isinstance(tokenizer, str) and tokenizer == "char" else load_tokenizer(tokenizer)
    ids = tok.encode(text, add_special_tokens=False)
    return ids, tok.vocab_size, tok.decode, tok


def load_tokenizer(tokenizer: str | Path | Tokenizer) -> Tokenizer:
    """A Tokenizer object, or one read from a folder or an embedded model's name (``minilm-l6``)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    from featherlm.hub import resolve

    path = resolve(tokenizer)
    if path.is_file():  # a GGUF file: its vocabulary
        from featherlm.checkpoint.gguf import read_gguf_tokenizer

        return read_gguf_tokenizer(path)
    return Tokenizer.from_dir(path)


def split_ids(ids: Sequence[int], val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """The first (1 - val_fraction) of the tokens for training, the rest for validation (the split of
    nanoGPT's Shakespeare recipe: contiguous, the last 10%)."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = int(len(ids) * (1 - val_fraction))
    if n < 2 or len(ids) - n < 2:
        raise ConfigError(f"{len(ids)} tokens are too few to split into training and validation")
    return list(ids[:n]), list(ids[n:])


def streams(ids: Sequence[int] | torch.Tensor, n_streams: int) -> torch.Tensor:
    """(n_streams, N) contiguous streams of ``ids`` (the tail that does not divide evenly is dropped)."""
    data = torch.as_tensor(ids, dtype=torch.long)
    n = data.numel() // n_streams
    if n < 2:
        raise ConfigError(f"{data.numel()} tokens cannot fill {n_streams} streams of at least 2 tokens")
    return data[: n * n_streams].view(n_streams, n)


# ----------------------------------------------------------------------------- language models


@torch.no_grad()
def evaluate_recurrent(model: RecurrentLM, ids: Sequence[int] | torch.Tensor, *, seq_len: int = 512,
                       n_streams: int = 1) -> dict[str, float]:
    """Mean next-token loss over ``ids`` read as ``n_streams`` streams with the state carried: every
    token after the first of its stream is scored with all of the stream before it."""
    was_training = model.training
    model.eval()
    data = streams(ids, n_streams).to(model.embed_tokens.weight.device)
    total, count, state = 0.0, 0, None
    for start in range(0, data.shape[1] - 1, seq_len):
        x = data[:, start:start + seq_len]  # (S, t)
        y = data[:, start + 1:start + seq_len + 1]  # (S, t') with t' = t or t - 1 at the end
        out = model(x[:, : y.shape[1]], state=state)
        total += float(F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
        state = out.state
    model.train(was_training)
    nll = total / count
    return {"nll": nll, "tokens": count, "bits_per_token": nll / LN2, "perplexity": math.exp(min(nll, 700))}


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, ids: Sequence[int] | torch.Tensor, *, block: int,
                     stride: int | None = None) -> dict[str, float]:
    """Mean next-token loss of a fixed-context model (a transformer decoder: ``model(x).logits``) over
    ``ids``, the counterpart of ``evaluate_recurrent``: windows of ``block`` inputs every ``stride``
    tokens (default ``block // 2``), each target scored once, in the first window that gives it
    ``block - stride`` tokens of context (the first window scores all of its targets). ``stride ==
    block`` is nanoGPT's consecutive windows, where a window's first tokens see almost no context."""
    stride = stride or max(block // 2, 1)
    if not 1 <= stride <= block:
        raise ConfigError(f"stride must be in [1, block={block}], got {stride}")
    data = torch.as_tensor(ids, dtype=torch.long)
    n = data.numel()
    if n < 2:
        raise ConfigError(f"{n} tokens are too few to score")
    was_training = model.training
    model.eval()
    total, count, scored_to = 0.0, 0, 1  # targets data[1:scored_to] are done
    for begin in range(0, n - 1, stride):
        end = min(begin + block, n - 1)
        x, y = data[begin:end][None], data[begin + 1:end + 1]  # (1, t), (t,)
        first = scored_to - (begin + 1)  # the targets before it were scored by earlier windows
        logits = model(x).logits[0, first:]  # (t - first, V)
        total += float(F.cross_entropy(logits.float(), y[first:], reduction="sum"))
        count += y.numel() - first
        scored_to = end + 1
        if end == n - 1:
            break
    model.train(was_training)
    nll = total / count
    return {"nll": nll, "tokens": count, "bits_per_token": nll / LN2, "perplexity": math.exp(min(nll, 700))}


def lr_at(elapsed: float, budget: float, step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup over the first steps, then cosine decay to 10% by the end of the time budget."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(elapsed / budget, 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_recurrent(model: RecurrentLM, train_ids: Sequence[int], *, time_budget_s: float, seq_len: int = 32,
                    batch_size: int = 32, lr: float = 5e-3, weight_decay: float = 0.01, clip: float = 1.0,
                    warmup_steps: int = 20, max_steps: int | None = None, seed: int = 0, clock: str = "wall",
                    progress: bool = False) -> dict[str, Any]:
    """Truncated BPTT over contiguous streams until the time budget (or ``max_steps``) is spent."""
    now = clock_fn(clock)
    torch.manual_seed(seed)
    data = streams(train_ids, batch_size)  # (B, N)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    state, pos, step, tokens, epochs = None, 0, 0, 0, 0
    history: list[dict[str, float]] = []
    window_loss, window_steps = 0.0, 0
    bar = tqdm(total=round(time_budget_s), disable=not progress, unit="s", desc=model.config.cell, file=sys.stderr,
               dynamic_ncols=True)
    started = now()
    elapsed = 0.0
    while elapsed < time_budget_s and (max_steps is None or step < max_steps):
        if pos + 2 > data.shape[1]:  # end of the streams: a new epoch starts from a fresh state
            pos, state, epochs = 0, None, epochs + 1
        t = min(seq_len, data.shape[1] - 1 - pos)
        x, y = data[:, pos:pos + t], data[:, pos + 1:pos + t + 1]  # (B, t)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(elapsed, time_budget_s, step, lr, warmup_steps)
        out = model(x, state=state)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        state = detach_state(out.state)
        pos, step, tokens = pos + t, step + 1, tokens + x.numel()
        window_loss, window_steps = window_loss + float(loss.detach()), window_steps + 1
        elapsed = now() - started
        bar.update(max(int(elapsed) - bar.n, 0))
        if step % 50 == 0:
            history.append({"step": step, "time_s": round(elapsed, 2), "train_loss": window_loss / window_steps})
            bar.set_postfix(loss=f"{window_loss / window_steps:.3f}")
            window_loss, window_steps = 0.0, 0
    bar.close()
    last = window_loss / window_steps if window_steps else (history[-1]["train_loss"] if history else math.nan)
    return {"steps": step, "tokens_seen": tokens, "clock": clock, "epochs": round(epochs + pos / data.shape[1], 3),
            "train_loss": last, "time_s": round(elapsed, 2), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
            "history": history}


def train_lm_baseline(kind: str, train_ids: Sequence[int], val_ids: Sequence[int], vocab_size: int, *,
                      time_budget_s: float = 60.0, d_model: int = 256, n_layer: int = 2, dropout: float = 0.1,
                      tie_weights: bool = True, seq_len: int = 32, batch_size: int = 32, lr: float = 5e-3,
                      weight_decay: float = 0.01, clip: float = 1.0, order: int = 5, max_steps: int | None = None,
                      seed: int = 0, clock: str = "wall", out: str | Path | None = None,
                      progress: bool = False) -> dict[str, Any]:
    """Train one LM baseline and score it on the validation ids.

    ``kind``: ``ngram`` (Kneser-Ney of ``order``; fitting is one pass, the time budget does not apply)
    or ``rnn`` / ``lstm`` / ``gru`` (``d_model``, ``n_layer``... for the network, trained for
    ``time_budget_s`` seconds of ``clock`` time, evaluation excluded; see ``clock_fn``). ``out``: a
    folder to save the model in (``ngram.json``, or ``recurrent.json`` + ``model.safetensors``).

    Returns ``kind``, ``val_loss`` (nats per token), ``val_bits_per_token``, ``val_perplexity``,
    ``val_tokens``, ``params`` (stored n-grams for the n-gram model), ``time_s`` (training, in
    ``clock`` seconds), ``eval_s``, ``model`` (the trained model object) and, for the networks,
    steps, tokens seen, tokens/s and the loss history.
    """
    now = clock_fn(clock)
    if kind not in LM_KINDS:
        raise ConfigError(f"unknown LM baseline {kind!r}; expected one of {', '.join(LM_KINDS)}")
    if time_budget_s <= 0:
        raise ConfigError(f"time budget must be positive, got {time_budget_s}")
    result: dict[str, Any] = {"kind": kind, "vocab_size": vocab_size, "train_tokens": len(train_ids)}
    if kind == "ngram":
        started = now()
        lm = KneserNeyLM(order, vocab_size=vocab_size).fit(train_ids)
        result.update(order=order, params=lm.num_ngrams(), time_s=round(now() - started, 2), clock=clock)
        started = time.perf_counter()
        scores = lm.evaluate(val_ids)
        if out is not None:
            lm.save(Path(out) / "ngram.json")
    else:
        torch.manual_seed(seed)
        config = RecurrentConfig(vocab_size, d_model=d_model, n_layer=n_layer, cell=kind, dropout=dropout,  # type: ignore[arg-type]
                                 tie_weights=tie_weights)
        lm = RecurrentLM(config)
        result.update(config=config.to_dict(), params=lm.num_params())
        result.update(train_recurrent(lm, train_ids, time_budget_s=time_budget_s, seq_len=seq_len,
                                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, clip=clip,
                                      max_steps=max_steps, seed=seed, clock=clock, progress=progress))
        started = time.perf_counter()
        scores = evaluate_recurrent(lm, val_ids)
        if out is not None:
            lm.save(out)
    result.update(val_loss=scores["nll"], val_bits_per_token=scores["bits_per_token"],
                  val_perplexity=scores["perplexity"], val_tokens=scores["tokens"],
                  eval_s=round(time.perf_counter() - started, 2))
    result["model"] = lm
    return result


def lm_baseline_from_file(kind: str, path: str | Path, *, tokenizer: str | Path | Tokenizer = "char",
                          val_fraction: float = 0.1, sample_tokens: int = 0, seed: int = 0,
                          **options: Any) -> dict[str, Any]:
    """``train_lm_baseline`` on a text file: tokenised whole, the last ``val_fraction`` for validation.
    ``sample_tokens`` > 0 adds a sample continuing the first validation tokens (decoded text)."""
    text = read_text(path)
    ids, vocab_size, decode, _ = encode_text(text, tokenizer)
    train_ids, val_ids = split_ids(ids, val_fraction)
    result = train_lm_baseline(kind, train_ids, val_ids, vocab_size, seed=seed, **options)
    model = result.pop("model")
    result.update(data=str(path), tokenizer=str(tokenizer) if not isinstance(tokenizer, Tokenizer) else "given")
    if sample_tokens > 0:
        prompt = val_ids[:8]
        new = model.generate(prompt, sample_tokens, seed=seed)
        result["sample"] = decode(list(prompt) + list(new))
    return result


# ----------------------------------------------------------------------------- classifiers


@torch.no_grad()
def predict(model: torch.nn.Module, examples: Sequence[dict[str, Any]], *, batch_size: int, pad_id: int) -> list[int]:
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        predictions += model(batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
    model.train(was_training)
    return predictions


def train_classifier_baseline(kind: str, train_path: str | Path, eval_path: str | Path,
                              tokenizer: str | Path | Tokenizer, *, epochs: int = 3, time_budget_s: float | None = None,
                              batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0,
                              max_seq_len: int = 128, d_model: int = 128, dropout: float | None = None,
                              max_train_examples: int | None = None, seed: int = 0,
                              progress: bool = False) -> dict[str, Any]:
    """Train a TextCNN or BiLSTM classifier from scratch (random embeddings over ``tokenizer``'s
    vocabulary) on a classification file and score it on ``eval_path``.

    Stops after ``epochs`` or when ``time_budget_s`` is spent, whichever comes first. Returns
    ``kind``, ``accuracy``, ``f1`` (macro), ``eval`` (all classification metrics), ``params``,
    ``steps``, ``epochs``, ``time_s``, ``labels``.
    """
    if kind not in CLASSIFIER_KINDS:
        raise ConfigError(f"unknown classifier baseline {kind!r}; expected one of {', '.join(CLASSIFIER_KINDS)}")
    tok = load_tokenizer(tokenizer)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    train = read_classification(train_path)
    dev = read_classification(eval_path, labels=train.label_names)
    train_examples = encode_classification(train, tok, max_seq_len)
    if max_train_examples is not None:
        keep = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(seed))[:max_train_examples]
        train_examples = [train_examples[i] for i in keep.tolist()]
    dev_examples = encode_classification(dev, tok, max_seq_len)
    num_labels = max(len(train.label_names), 2)
    torch.manual_seed(seed)
    if kind == "textcnn":
        model: torch.nn.Module = TextCNN(tok.vocab_size, num_labels, d_embed=d_model,
                                         dropout=0.5 if dropout is None else dropout)
    else:
        model = BiLSTMClassifier(tok.vocab_size, num_labels, d_model=d_model, pad_id=pad_id,
                                 dropout=0.3 if dropout is None else dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    lengths = [len(e["input_ids"]) for e in train_examples]
    steps, epoch, stop = 0, 0, False
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=epochs * math.ceil(len(train_examples) / batch_size), disable=not progress, desc=kind,
               unit="step", file=sys.stderr, dynamic_ncols=True)
    for epoch in range(epochs):  # noqa: B007 (epoch is reported)
        for indices in batch_order(lengths, batch_size, seed=seed, epoch=epoch, bucket=True):
            batch = collate([train_examples[i] for i in indices], pad_id)
            loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            steps += 1
            bar.update(1)
            if time_budget_s is not None and time.perf_counter() - started >= time_budget_s:
                stop = True
                break
        if stop:
            break
    bar.close()
    train_time = time.perf_counter() - started
    predictions = predict(model, dev_examples, batch_size=2 * batch_size, pad_id=pad_id)
    metrics = classification_metrics(predictions, dev.labels, num_labels)
    return {"kind": kind, "accuracy": metrics["accuracy"], "f1": metrics["f1"], "eval": metrics,
            "params": sum(p.numel() for p in model.parameters()), "steps": steps,
            "epochs": round(steps * batch_size / max(len(train_examples), 1), 3), "time_s": round(train_time, 2),
            "train_examples": len(train_examples), "eval_examples": len(dev_examples),
            "labels": train.label_names, "model": model}
