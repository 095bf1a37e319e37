"""Decoding: greedy, sampling (temperature, top-k, top-p, min-p), repetition penalty, beam search,
stop strings, streaming, and batches of prompts of different lengths (left padding).

Two levels: ``generate_ids`` / ``beam_search`` work on token ids and a model only; ``generate`` and
``stream`` add a tokenizer (text in, text out, stop strings, timing figures).

Decoder-only models continue the prompt. Encoder-decoders (T5) encode the prompt once, then decode
from ``decoder_start_token_id``; the first decoder pass puts the encoder output's cross-attention keys
and values in the cache, so each later step runs the decoder on one token only. ``prefill`` and
``step`` are the only places that tell the two apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from featherlm.errors import GenerationError


@dataclass
class GenerationConfig:
    """How to pick tokens. ``temperature == 0`` means greedy; sampling otherwise."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p * p(best token)
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages tokens already in the sequence
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = logprob / length ** length_penalty
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, not a list of characters
            self.stop = [self.stop]

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise GenerationError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise GenerationError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise GenerationError("beam search is deterministic: use temperature 0 with num_beams > 1")


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool of tokens in prompt or output. Same rule as CTRL / HF."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from logits (B, V): argmax, or sampling after the warpers."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- id level


@dataclass
class Timing:
    """Wall-clock figures of one generation call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill pass; the decode loop made the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths: (B, T) ids and mask, padding on the left so that every
    row's next token is at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids, mask


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "encoder_decoder", False))


def check_prompts(model, prompts: list[list[int]], cfg: GenerationConfig) -> int:
    """Validate prompt lengths against the context; return how many new tokens fit.

    An encoder-decoder reads up to a context of prompt and writes up to a context of new tokens;
    a decoder-only model holds both in one context."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: at least one token is needed")
    longest, context = max(len(p) for p in prompts), model.config.max_seq_len
    if is_encoder_decoder(model):
        if longest > context:
            raise GenerationError(f"prompt has {longest} tokens but the model's encoder reads {context} tokens")
        return min(cfg.max_new_tokens, context)
    if longest >= context:
        raise GenerationError(f"prompt has {longest} tokens but the model's context is {context} tokens")
    return min(cfg.max_new_tokens, context - longest)


def cache_length(model, prompt_len: int, budget: int) -> int:
    """Positions the KV cache must hold: prompt and new tokens, or for an encoder-decoder the start
    token and the new tokens (the prompt lives in the encoder)."""
    return (1 if is_encoder_decoder(model) else prompt_len) + budget


def start_ids(model, batch_size: int, device: torch.device) -> torch.Tensor:
    """The first decoder input of an encoder-decoder: decoder_start_token_id per row, (B, 1)."""
    start = model.config.decoder_start_token_id
    if start is None:
        raise GenerationError("this encoder-decoder has no decoder_start_token_id in its config")
    return torch.full((batch_size, 1), start, dtype=torch.long, device=device)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
    """Run the prompts (B, T) (mask (B, T) or None without padding) into the cache; next-token logits (B, V)."""
    if is_encoder_decoder(model):
        start = start_ids(model, ids.shape[0], ids.device)
        return model(ids, attention_mask=mask, decoder_input_ids=start, cache=cache, last_only=True).logits[:, -1]
    return model(ids, attention_mask=mask, cache=cache, last_only=True).logits[:, -1]


def step(model, tokens: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
    """Feed one new token per row, (B,); logits (B, V). ``mask`` (B, S): a padded decoder-only batch's
    mask over cache + new token (an encoder-decoder's source mask is in the cache already)."""
    if is_encoder_decoder(model):
        return model(decoder_input_ids=tokens[:, None], cache=cache, last_only=True).logits[:, -1]
    return model(tokens[:, None], attention_mask=mask, cache=cache, last_only=True).logits[:, -1]


@torch.inference_mode()
def iter_tokens(
    model,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    pad_id: int = 0,
    timing: Timing | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step, until all rows ended or max tokens.

    Rows that already produced an end token keep receiving ``pad_id`` (callers drop those).
    """
    cfg.check()
    budget = check_prompts(model, prompts, cfg)
    timing = timing if timing is not None else Timing()
    device = model.embed_tokens.weight.device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, T = ids.shape
    padded = bool((mask == 0).any())
    encdec = is_encoder_decoder(model)
    cache = model.new_cache(B, cache_length(model, T, budget))
    generator = _generator(cfg.seed, device)
    seen = None
    if cfg.repetition_penalty != 1.0:
        # the tokens of the sequence being written: the prompt (decoders), the start token (encoder-
        # decoders, as transformers does). scatter_add, not scatter_: a pad id that also occurs in a
        # prompt must not unset it
        written, real = (start_ids(model, B, device), None) if encdec else (ids, mask)
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.long, device=device)
        seen = seen.scatter_add_(1, written, real if real is not None else torch.ones_like(written)) > 0
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    timing.prompt_tokens = int(mask.sum())
    start = time.perf_counter()
    logits = prefill(model, ids, mask if padded else None, cache)
    for n in range(budget):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        token = sample_next(logits, cfg, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        now = time.perf_counter()
        if n == 0:
            timing.prefill_s = now - start
        else:
            timing.decode_s = now - start
        timing.new_tokens += 1
        yield token
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        done = done | torch.isin(token, eos)
        if bool(done.all()) or n == budget - 1:
            break
        if padded and not encdec:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        if n == 0:
            start = time.perf_counter()
        logits = step(model, token, mask if padded and not encdec else None, cache)


def generate_ids(model, prompts: list[list[int]], cfg: GenerationConfig, eos_ids=frozenset(), pad_id: int = 0,
                 timing: Timing | None = None) -> list[list[int]]:
    """New token ids for each prompt (end token excluded); beam search when cfg.num_beams > 1."""
    if cfg.num_beams > 1:
        return [beam_search(model, p, cfg, eos_ids, timing) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    for token in iter_tokens(model, prompts, cfg, eos_ids, pad_id, timing):
        for i, t in enumerate(token.tolist()):
            if not ended[i]:
                if t in eos_ids:
                    ended[i] = True
                else:
                    out[i].append(t)
    return out


@torch.inference_mode()
def beam_search(model, prompt: list[int], cfg: GenerationConfig, eos_ids=frozenset(),
                timing: Timing | None = None) -> list[int]:
    """Best continuation of one prompt by beam search with a length penalty (as in HF / fairseq).

    Keeps ``num_beams`` live hypotheses; a hypothesis that emits an end token is moved to the
    finished list, scored ``sum logprob / len ** length_penalty``. Stops when no live beam can beat
    the worst kept finished one, or at max_new_tokens.
    """
    cfg.check()
    budget = check_prompts(model, [prompt], cfg)
    timing = timing if timing is not None else Timing()
    if budget == 0:
        return []
    device = model.embed_tokens.weight.device
    k = cfg.num_beams
    cache = model.new_cache(1, cache_length(model, len(prompt), budget))
    written = [model.config.decoder_start_token_id] if is_encoder_decoder(model) else prompt  # for the penalty
    start = time.perf_counter()
    logits = prefill(model, torch.tensor([prompt], device=device), None, cache)
    timing.prompt_tokens += len(prompt)
    timing.prefill_s += time.perf_counter() - start
    start = time.perf_counter()
    cache.reorder(torch.zeros(k, dtype=torch.long, device=device))  # k copies of the prompt's cache
    beams: list[list[int]] = [[] for _ in range(k)]
    scores = torch.full((k,), float("-inf"), device=device)
    scores[0] = 0.0  # only one distinct beam at the start
    logits = logits.expand(k, -1)
    finished: list[tuple[float, list[int]]] = []
    for n in range(budget):
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            for i, b in enumerate(beams):
                seen[i, written + b] = True
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        logprobs = logits.float().log_softmax(-1) + scores[:, None]  # (k, V)
        top, flat = logprobs.view(-1).topk(2 * k)  # 2k so that k live beams survive end tokens
        vocab = logits.shape[-1]
        next_beams, next_scores, origin, tokens = [], [], [], []
        for score, index in zip(top.tolist(), flat.tolist(), strict=True):
            src, tok = divmod(index, vocab)
            if tok in eos_ids:
                length = len(beams[src]) + 1
                finished.append((score / length**cfg.length_penalty, beams[src]))
                continue
            next_beams.append(beams[src] + [tok])
            next_scores.append(score)
            origin.append(src)
            tokens.append(tok)
            if len(next_beams) == k:
                break
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:k]
        if not next_beams:
            break
        best_live = max(next_scores) / (len(next_beams[0]) ** cfg.length_penalty)
        if len(finished) == k and finished[-1][0] >= best_live or n == budget - 1:
            break
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        cache.reorder(torch.tensor(origin, device=device))
        logits = step(model, torch.tensor(tokens, device=device), None, cache)
    for beam, score in zip(next_beams, next_scores, strict=True):
        finished.append((score / len(beam) ** cfg.length_penalty, beam))
    best = max(finished, key=lambda f: f[0])[1]
    timing.new_tokens += len(best)
    timing.decode_s += time.perf_counter() - start
    return best


# ----------------------------------------------------------------------------- text level


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    timing: Timing

    def to_dict(self) -> dict:
        t = self.timing
        return {
            "text": self.text, "finish_reason": self.finish_reason, "prompt_tokens": t.prompt_tokens,
            # new_tokens: the tokens of the text; an end-of-sequence token is not counted
            "new_tokens": len(self.token_ids), "prefill_tokens_per_s": round(t.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(t.decode_tokens_per_s, 2),
        }


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (not safe to show yet)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def stream(model, tokenizer, prompt: str | list[int], cfg: GenerationConfig | None = None,
           timing: Timing | None = None, on_done: Callable[[GenerationResult], None] | None = None) -> Iterator[str]:
    """Yield text pieces as tokens are generated (one prompt, sampling or greedy).

    Stop strings are honoured without ever showing a part of them: text that might begin a stop
    string is held back until it is clear. ``on_done`` receives the final GenerationResult.
    """
    cfg = cfg or GenerationConfig()
    if cfg.num_beams > 1:
        raise GenerationError("streaming needs num_beams == 1 (beam search picks its winner at the end)")
    timing = timing if timing is not None else Timing()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    decoder = tokenizer.stream()
    eos = tokenizer.eos_ids
    out_ids: list[int] = []
    text, shown, reason, cut = "", 0, "length", False
    for token in iter_tokens(model, [ids], cfg, eos, tokenizer.pad_id, timing):
        t = int(token[0])
        if t in eos:
            reason = "stop"
            break
        out_ids.append(t)
        text, cut = _cut_at_stop(text + decoder.feed(t), cfg.stop)
        if cut:
            reason = "stop"
            break
        safe = len(text) - _held_back(text, cfg.stop)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    if not cut:  # bytes of an unfinished character, and text held back for a stop that never came
        text, cut = _cut_at_stop(text + decoder.flush(), cfg.stop)
        reason = "stop" if cut else reason
    if len(text) > shown:
        yield text[shown:]
    if on_done is not None:
        on_done(GenerationResult(text, out_ids, reason, timing))


def generate(model, tokenizer, prompt: str | list[int], cfg: GenerationConfig | None = None) -> GenerationResult:
    """Generate a continuation of one prompt and return it with timing figures."""
    cfg = cfg or GenerationConfig()
    timing = Timing()
    if cfg.num_beams > 1:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        new = beam_search(model, ids, cfg, tokenizer.eos_ids, timing)
        text, stopped = _cut_at_stop(tokenizer.decode(new), cfg.stop)
        budget = check_prompts(model, [ids], cfg)  # max_new_tokens, clamped to the context
        reason = "stop" if stopped or len(new) < budget else "length"
        return GenerationResult(text, new, reason, timing)
    results: list[GenerationResult] = []
    for _ in stream(model, tokenizer, prompt, cfg, timing, on_done=results.append):
        pass
    return results[0]


def generate_batch(model, tokenizer, prompts: list[str], cfg: GenerationConfig | None = None) -> list[str]:
    """Continuations of several prompts in one batch (left padded), stop strings applied per row."""
    cfg = cfg or GenerationConfig()
    encoded = [tokenizer.encode(p) for p in prompts]
    new = generate_ids(model, encoded, cfg, tokenizer.eos_ids, tokenizer.pad_id)
    return [_cut_at_stop(tokenizer.decode(ids), cfg.stop)[0] for ids in new]
