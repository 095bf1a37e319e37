"""Perplexity of a causal LM on a text, with a sliding window (Hugging Face's fixed-length recipe).

A text longer than the context is scored window by window. Windows start every ``stride`` tokens
and are ``window`` tokens long; each window scores only the tokens the previous one did not reach,
so every token after the first is scored exactly once, and (except in the first window) with at
least ``window - stride`` tokens of left context. This is the scheme of the transformers guide
"Perplexity of fixed-length models", so figures compare with those computed by its code:

    for begin in range(0, N, stride):
        end = min(begin + window, N); scored = end - prev_end      # the last `scored` tokens
        ... prev_end = end; stop once end == N

The first token of the text has no context and is never scored (the guide's label shift drops
it too); nor is the first token of any window when ``stride == window`` (no overlap, no
context). Totals are exact sums over tokens: the guide weights each window's mean loss by its
target count less one, which differs from the exact sum by well under 0.5% with strides of
hundreds of tokens (up to ~0.6% with strides of 5 tokens, see the tests).

bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the text: unlike perplexity it does not
depend on the tokenizer, so models with different vocabularies can be compared.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from featherlm.errors import ConfigError
from featherlm.evaluate.metrics import perplexity as exp_loss
from featherlm.model.layers import linear

LOGIT_CHUNK = 1024  # positions whose logits exist at once: (1024, V) fp32 is 200 MB for a 49k vocabulary


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) of each window over ``n_tokens`` tokens: the window covers tokens
    [begin, end) and scores its last ``scored`` ones (the first window: all but token 0)."""
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ConfigError(f"stride must be between 1 and the window ({window}), got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        # a window's first token has no context inside it: never a target (the guide's label shift)
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return [w for w in out if w[2] > 0]


def window_nll(model, ids: torch.Tensor, scored: list[int]) -> torch.Tensor:
    """Summed NLL (nats) of the last ``scored[b]`` tokens of each row of ``ids`` (B, T), all rows
    the same length. The model runs once with ``last_only`` (no (B, T, V) logits) and the
    unembedding is applied to its final hidden states in chunks, which keeps memory flat for
    long windows and large vocabularies."""
    out = model(ids, last_only=True)
    hidden = out.hidden  # (B, T, C): after the final norm
    weight = model.output_weight  # (V, C)
    T = ids.shape[1]
    totals = []
    for b, n in enumerate(scored):
        start = T - n  # predicted tokens ids[b, start:], from the positions just before them
        total = hidden.new_zeros((), dtype=torch.float32)
        for lo in range(start, T, LOGIT_CHUNK):
            hi = min(lo + LOGIT_CHUNK, T)
            logits = linear(hidden[b, lo - 1:hi - 1], weight).float()  # (chunk, V)
            total = total + F.cross_entropy(logits, ids[b, lo:hi], reduction="sum")
        totals.append(total)
    return torch.stack(totals)  # (B,)


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, *, window: int | None = None, stride: int | None = None,
               batch_size: int = 1, bf16: bool = False) -> dict[str, Any]:
    """Sliding-window perplexity of ``model`` (a featherlm decoder) on ``text``.

    ``window``: tokens per forward pass (default: the model's context); ``stride``: tokens between
    window starts (default ``window // 2``: every scored token sees at least half a window of
    context). ``batch_size`` windows of equal length run together. ``bf16``: autocast to bf16
    (the result then differs from fp32 by a little). Returns ``{"tokens", "nll", "bits_per_byte",
    "perplexity", "window", "stride", "windows", "bytes"}``: ``tokens`` scored, ``nll`` their mean
    NLL in nats.
    """
    config = model.config
    if not config.causal:
        raise ConfigError(f"perplexity needs a causal language model; this one is an encoder ({config.family})")
    window = window or config.max_seq_len
    if window > config.max_seq_len:
        raise ConfigError(f"window {window} is longer than the model's context ({config.max_seq_len} tokens)")
    stride = stride or max(window // 2, 1)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    n_bytes = len(text.encode("utf-8"))
    spans = windows(len(ids), window, stride)
    if not spans:
        raise ConfigError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    try:
        with context:
            i = 0
            while i < len(spans):
                length = spans[i][1] - spans[i][0]
                group = [spans[i]]  # consecutive windows of the same length share a batch
                while (len(group) < batch_size and i + len(group) < len(spans)
                       and spans[i + len(group)][1] - spans[i + len(group)][0] == length):
                    group.append(spans[i + len(group)])
                batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # (B, T)
                total += float(window_nll(model, batch, [s for _, _, s in group]).sum())
                count += sum(s for _, _, s in group)
                i += len(group)
    finally:
        model.train(was_training)
    mean = total / count
    return {"tokens": count, "nll": mean, "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
            "perplexity": exp_loss(mean), "window": window, "stride": stride, "windows": len(spans),
            "bytes": n_bytes}


__all__ = ["perplexity", "windows", "window_nll"]
