"""Continuous batching for decoder models: concurrent requests are decoded together, one token per step.

One background thread owns the decoder models. Each model (a base or a base with an adapter merged
in) has its own running batch, because rows of one forward pass must share the weights; the thread
advances every non-empty batch by one token per iteration (round robin), and between iterations
admits waiting requests and lets finished or cancelled ones leave (iteration-level batching, as in
Orca / vLLM).

How a request joins a running batch. The batch's KV cache is one preallocated buffer per layer,
``(rows, Hkv, P + width, D)``, with every row's tokens right-aligned: all rows end at column
``P + width`` (P: prompt-tuning vectors, which the model keeps at the front), and a row's left part is
padding that its attention mask hides. The prompts joining at one step are prefilled together in a
fresh cache (left padded, as ``featherlm.generate.generate_batch`` does; a prompt joining alone runs
unpadded, exactly as ``featherlm.generate.generate``), their first tokens are sampled, and their
keys/values are copied into free rows of the buffer, right-aligned. When it is longer than the batch, the batch is
shifted right once; when rows leave, the last rows move into the holes (a copy of a few rows, not of
the whole cache); when the common padding on the left grows, the batch is shifted left. Positions come
from the mask (``Transformer.default_positions``), so a padded row sees the positions it would see
alone, and greedy output equals unbatched greedy output (up to float rounding in batched matmuls).

Each row samples with its own ``torch.Generator`` and settings, so a seeded request gives the same
tokens whatever else shares its batch. Stop strings are applied per row exactly as
``featherlm.generate.stream`` does (text that may begin a stop string is held back).

The engine never touches the event loop of a web server: results go to a ``sink`` callable (called on
the engine thread), which the HTTP layer turns into asyncio queue puts. Models are only read, never
modified, so other threads may run forward passes on them at the same time.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from featherlm.errors import GenerationError
from featherlm.generate import (
    GenerationConfig,
    _cut_at_stop,
    _held_back,
    apply_repetition_penalty,
    left_pad,
    sample_next,
)
from featherlm.model.layers import KVCache

log = logging.getLogger("featherlm.serve")
PREFILL_ROWS = 16  # prompts per prefill pass: joining requests share the passes (and the weight reads)
PREFILL_TOKENS = 4096  # padded tokens per prefill pass: bounds its activations and attention scores


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already (the HTTP layer answers 429)."""


@dataclass
class Event:
    """What the engine reports about a request, in order: ``text`` pieces per choice, one ``finish``
    per choice, then one ``done`` (usage and time to first token); or one ``error``."""

    kind: str  # "text" | "finish" | "done" | "error"
    index: int = 0  # choice index: prompt number * n + sample number
    text: str = ""
    finish_reason: str | None = None  # "stop" (end token or stop string) or "length"
    tokens: int = 0  # finish: tokens this choice generated (an end token is not counted)
    prompt_tokens: int = 0  # done: over all prompts (each counted once, whatever n)
    completion_tokens: int = 0  # done: over all choices
    ttft: float | None = None  # done: seconds from submit to the first sampled token


@dataclass(eq=False)
class _Request:
    model: str
    prompts: list[list[int]]
    cfg: GenerationConfig
    n: int
    ignore_eos: bool
    sink: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    first_token_at: float | None = None
    live: int = 0  # choices not finished yet
    completion_tokens: int = 0

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def emit(self, event: Event) -> None:
        if self.cancelled:
            return
        try:
            self.sink(event)
        except Exception:  # a broken sink (closed loop) must not stop the engine
            log.exception("result sink failed; cancelling the request")
            self.cancelled = True


class Ticket:
    """A handle on a submitted request: ``cancel()`` frees its queue place or batch rows."""

    def __init__(self, engine: Engine, request: _Request) -> None:
        self._engine, self._request = engine, request

    def cancel(self) -> None:
        self._engine._cancel(self._request)

    @property
    def cancelled(self) -> bool:
        return self._request.cancelled


# ----------------------------------------------------------------------------- one row


class _Row:
    """One choice being generated: sampling state, stop handling and streaming text."""

    def __init__(self, req: _Request, index: int, prompt: list[int], tokenizer, context: int, vocab: int,
                 device: torch.device) -> None:
        self.req, self.index, self.prompt_len = req, index, len(prompt)
        self.cfg = req.cfg
        self.budget = min(self.cfg.max_new_tokens, context - len(prompt))  # as generate.check_prompts
        sample = index % req.n
        seed = self.cfg.seed
        if seed is None:
            seed = secrets.randbits(63)
        elif sample:
            seed = (seed + sample) % 2**64  # n samples of one seeded request differ from each other
        self.generator = torch.Generator(device=device).manual_seed(seed) if self.cfg.temperature > 0 else None
        self.plain_greedy = self.cfg.temperature == 0 and self.cfg.repetition_penalty == 1.0  # pick == argmax
        self.seen = None  # (1, V) tokens of prompt and output, for the repetition penalty
        if self.cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(prompt, device=device)] = True
        self.eos = frozenset() if req.ignore_eos else tokenizer.eos_ids
        self.decoder = tokenizer.stream()
        self.out_ids: list[int] = []
        self.sampled = 0
        self.text, self.shown = "", 0
        self.finished = False
        self.pending = 0  # the last sampled token: the input of the next step

    def pick(self, logits: torch.Tensor) -> int:
        """Sample this row's next token from its logits (1, V), as iter_tokens does for one prompt."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.cfg.repetition_penalty)
        return int(sample_next(logits, self.cfg, self.generator)[0])

    def accept(self, token: int) -> None:
        """Take a sampled token: stream the text it completes, finish on end token, stop string or budget."""
        self.sampled += 1
        self.pending = token
        if self.seen is not None:
            self.seen[0, token] = True
        if token in self.eos:
            self._finish("stop", cut=False)
            return
        self.out_ids.append(token)
        self.text, cut = _cut_at_stop(self.text + self.decoder.feed(token), self.cfg.stop)
        if cut:
            self._finish("stop", cut=True)
            return
        safe = len(self.text) - _held_back(self.text, self.cfg.stop)
        if safe > self.shown:
            self.req.emit(Event("text", self.index, self.text[self.shown:safe]))
            self.shown = safe
        if self.sampled >= self.budget:
            self._finish("length", cut=False)

    def _finish(self, reason: str, cut: bool) -> None:
        if not cut:  # bytes of an unfinished character, and text held back for a stop that never came
            self.text, cut = _cut_at_stop(self.text + self.decoder.flush(), self.cfg.stop)
            reason = "stop" if cut else reason
        if len(self.text) > self.shown:
            self.req.emit(Event("text", self.index, self.text[self.shown:]))
            self.shown = len(self.text)
        self.finished = True
        req = self.req
        req.emit(Event("finish", self.index, finish_reason=reason, tokens=len(self.out_ids)))
        req.completion_tokens += len(self.out_ids)
        req.live -= 1
        if req.live == 0:
            ttft = None if req.first_token_at is None else req.first_token_at - req.submitted
            req.emit(Event("done", prompt_tokens=sum(len(p) for p in req.prompts),
                           completion_tokens=req.completion_tokens, ttft=ttft))


# ----------------------------------------------------------------------------- one model's batch


class _View(KVCache):
    """The first ``rows`` rows of a batch's cache buffers, filled up to ``length``: what forward() sees.

    Slices share memory with the buffers, so the keys/values the model writes land in the batch."""

    def __init__(self, store: KVCache, rows: int, length: int, config) -> None:
        super().__init__(config, 0, 0, store.keys[0].dtype, store.keys[0].device)  # empty; then share the store's
        self.keys = [k[:rows] for k in store.keys]
        self.values = [v[:rows] for v in store.values]
        self.max_len = store.max_len
        self.length = length


class _Batch:
    """The running rows of one model and their shared, right-aligned KV cache (see the module doc)."""

    def __init__(self, model, max_rows: int) -> None:
        self.model = model
        self.max_rows = max_rows
        self.prefix = model.embed_prefix.num_tokens if model.embed_prefix is not None else 0  # P
        self.context = model.config.max_seq_len
        self.device = model.embed_tokens.weight.device
        self.rows: list[_Row] = []
        self.store: KVCache | None = None  # buffers (R, Hkv, P + M, D) per layer
        self.capacity = 0  # M: token columns of the buffers
        self.width = 0  # token columns in use; every row ends at column P + width
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, width) 1 = real token

    # ----- layout
    def _buffers(self) -> list[torch.Tensor]:
        return [*self.store.keys, *self.store.values]

    def _reserve(self, rows: int, width: int, hint: int = 0) -> None:
        """Make the buffers hold ``rows`` rows and ``width`` token columns, keeping the live rows. Growth
        doubles (copies stay rare); ``hint``: columns the rows are expected to need."""
        have_rows = self.store.keys[0].shape[0] if self.store is not None else 0
        if rows <= have_rows and width <= self.capacity:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, min(2 * have_rows, self.max_rows))
        grown = min(self.context, max(2 * self.capacity, 64, hint))
        new_cap = self.capacity if width <= self.capacity else max(width, grown)
        store = self.model.new_cache(new_rows, new_cap)  # zeros: stale columns are masked, never NaN
        if self.store is not None and self.rows:
            B, used = len(self.rows), self.prefix + self.width
            for new, old in zip([*store.keys, *store.values], self._buffers(), strict=True):
                new[:B, :, :used] = old[:B, :, :used]
        self.store, self.capacity = store, new_cap

    def _shift(self, d: int) -> None:
        """Move every live row ``d`` columns to the right (a longer prompt is joining)."""
        B, P, W = len(self.rows), self.prefix, self.width
        if B:
            for buf in self._buffers():
                buf[:B, :, P + d:P + W + d] = buf[:B, :, P:P + W].clone()
        self.mask = torch.cat([self.mask.new_zeros(B, d), self.mask], dim=1)
        self.width += d

    def _compact(self) -> None:
        """Drop the padding columns every row has on the left (left by rows that finished)."""
        if not self.rows:
            return
        lead = self.width - int(self.mask.sum(1).max())
        if lead <= 0:
            return
        B, P, W = len(self.rows), self.prefix, self.width
        for buf in self._buffers():
            buf[:B, :, P:P + W - lead] = buf[:B, :, P + lead:P + W].clone()
        self.mask = self.mask[:, lead:]
        self.width -= lead

    # ----- rows in and out
    def add(self, joiners: list[tuple[list[_Row], int]], prefill: KVCache, prefill_mask: torch.Tensor) -> None:
        """Join rows whose prompts were prefilled together: ``prefill`` holds m prompts right-aligned over
        P + Lj positions, ``prefill_mask`` (m, Lj) their padding; each joiner is (rows, prefill row)."""
        length = prefill_mask.shape[1]
        if max(self.width, length) + 1 > self.context:
            self._compact()  # rows are never longer than the context; only their padding can be
        source = torch.tensor([j for rows, j in joiners for _ in rows], device=self.device)  # (k,)
        B, k, P = len(self.rows), len(source), self.prefix
        width = max(self.width, length)
        ahead = max(r.budget - r.sampled for rows, _ in joiners for r in rows)  # tokens still to come
        self._reserve(B + k, width + 1, hint=width + 1 + min(ahead, 256))  # long answers grow by doubling
        if width > self.width:
            self._shift(width - self.width)
        for buf, src in zip(self._buffers(), [*prefill.keys, *prefill.values], strict=True):
            buf[B:B + k, :, :P] = src[source, :, :P]
            buf[B:B + k, :, P + width - length:P + width] = src[source, :, P:P + length]
        joined = self.mask.new_zeros(k, width)
        joined[:, width - length:] = prefill_mask[source]
        self.mask = torch.cat([self.mask, joined])
        self.rows.extend(row for rows, _ in joiners for row in rows)

    def drop_done(self) -> None:
        """Remove finished and cancelled rows; the last live rows move into the holes."""
        alive = [not (r.finished or r.req.cancelled) for r in self.rows]
        keep = sum(alive)
        if keep == len(self.rows):
            return
        if keep == 0:  # free the buffers; the next request allocates what it needs
            self.rows, self.store, self.capacity, self.width = [], None, 0, 0
            self.mask = self.mask.new_zeros(0, 0)
            return
        movers = [i for i in range(keep, len(self.rows)) if alive[i]]
        holes = [i for i in range(keep) if not alive[i]]
        if movers:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            used = self.prefix + self.width
            for buf in self._buffers():
                buf[dst, :, :used] = buf[src, :, :used]
            self.mask[dst] = self.mask[src]
            for s, d in zip(movers, holes, strict=True):
                self.rows[d] = self.rows[s]
        self.rows = self.rows[:keep]
        self.mask = self.mask[:keep]
        lead = self.width - int(self.mask.sum(1).max())
        if lead >= 32 and 2 * lead >= self.width:  # attention would mostly read padding
            self._compact()

    # ----- decoding
    @torch.inference_mode()
    def step(self) -> int:
        """Feed every row its pending token; sample and hand out the next one. Returns the rows stepped."""
        self.drop_done()
        if not self.rows:
            return 0
        if self.width + 1 > self.capacity:
            self._compact()
            self._reserve(len(self.rows), self.width + 1)
        B = len(self.rows)
        mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)  # (B, width + 1)
        tokens = torch.tensor([r.pending for r in self.rows], device=self.device)[:, None]  # (B, 1)
        cache = _View(self.store, B, self.prefix + self.width, self.model.config)
        padded = not bool(mask.all())
        logits = self.model(tokens, attention_mask=mask if padded else None, cache=cache,
                            last_only=True).logits[:, -1]  # (B, V)
        self.mask, self.width = mask, self.width + 1
        best = logits.argmax(-1).tolist()  # greedy rows (the usual case) need no per-row work
        for i, row in enumerate(self.rows):
            if not row.req.cancelled:
                row.accept(best[i] if row.plain_greedy else row.pick(logits[i:i + 1]))
        self.drop_done()
        return B


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Decodes the requests for several decoder models on one background thread.

    ``models`` maps a name to a LoadedModel (model + tokenizer). ``max_batch`` bounds the rows decoded
    together (over all models; a request with more choices than that still runs, alone);
    ``max_queue`` bounds the requests waiting to join, beyond which ``submit`` raises QueueFull.
    ``max_batch=1`` serves requests strictly one after another (the baseline batching is compared to).
    """

    def __init__(self, models: Mapping[str, object], *, max_batch: int = 32, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.models = dict(models)
        self.max_batch, self.max_queue = max_batch, max_queue
        self._pending: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._batches: dict[str, _Batch] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (one per batch per iteration)
        self.step_rows = 0  # rows over all steps: step_rows / steps is the mean batch size
        self.prefills = 0  # prompts prefilled
        self.sampled = 0  # tokens sampled, end tokens and unfinished requests included: the work done

    # ----- life cycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="featherlm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; requests still waiting or running get an error event."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("the server is shutting down")

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._pending and not self.running_rows():
                    self._cv.wait()
                if self._stopping:
                    return
            self.run_once()

    # ----- requests
    def submit(self, model: str, prompts: list[list[int]], cfg: GenerationConfig, sink: Callable[[Event], None], *,
               n: int = 1, ignore_eos: bool = False) -> Ticket:
        """Queue ``n`` choices for each prompt (token ids); results go to ``sink`` (see Event).

        Raises KeyError for a model the engine does not hold, GenerationError for a request that cannot
        be served (empty prompt, prompt not shorter than the context, bad settings) and QueueFull.
        """
        if model not in self.models:
            raise KeyError(model)
        cfg.check()
        if cfg.num_beams > 1:
            raise GenerationError("the server decodes with sampling or greedy search; num_beams must be 1")
        if n < 1 or not prompts:
            raise GenerationError("a request needs at least one prompt and n >= 1")
        context = self.models[model].model.config.max_seq_len
        for p in prompts:
            if not p:
                raise GenerationError("empty prompt: at least one token is needed")
            if len(p) >= context:
                raise GenerationError(f"prompt has {len(p)} tokens but the model's context is {context} tokens")
        req = _Request(model, [list(p) for p in prompts], cfg, n, ignore_eos, sink)
        req.live = req.rows
        with self._cv:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (max_queue {self.max_queue})")
            self._pending.append(req)
            self._cv.notify_all()
        return Ticket(self, req)

    def _cancel(self, req: _Request) -> None:
        req.cancelled = True  # running rows leave at the start of their batch's next step
        with self._cv:
            try:
                self._pending.remove(req)
            except ValueError:
                pass

    # ----- one iteration
    def running_rows(self) -> int:
        return sum(len(b.rows) for b in list(self._batches.values()))

    def run_once(self) -> None:
        """Admit waiting requests that fit (prefill, first token), then advance every batch one token.

        The background thread calls this in a loop; tests may call it directly on an engine that was
        never started, to place joins at chosen steps."""
        admitted = []
        with self._cv:
            rows = self.running_rows()
            while self._pending:
                req = self._pending[0]
                if rows and rows + req.rows > self.max_batch:
                    break  # first come, first served: no overtaking by smaller requests
                self._pending.popleft()
                if not req.cancelled:
                    admitted.append(req)
                    rows += req.rows
        by_model: dict[str, list[_Request]] = {}
        for req in admitted:
            by_model.setdefault(req.model, []).append(req)
        for model, requests in by_model.items():
            self._prefill(model, requests)
        for name, batch in list(self._batches.items()):
            if not batch.rows:
                continue
            try:
                self.steps += 1
                self.step_rows += len(batch.rows)
                self.sampled += batch.step()
            except Exception as e:
                log.exception("decode step failed")
                for row in batch.rows:
                    row.req.emit(Event("error", text=f"generation failed: {e}"))
                    row.req.cancelled = True
                self._batches[name] = _Batch(batch.model, self.max_batch)

    def _prefill(self, model_name: str, requests: list[_Request]) -> None:
        """Prefill the prompts joining ``model_name``'s batch, several per forward pass (left padded),
        sample each one's first token(s), and let the rows that go on join the batch."""
        batch = self._batches.get(model_name)
        if batch is None:
            batch = self._batches[model_name] = _Batch(self.models[model_name].model, self.max_batch)
        prompts = sorted(((req, p) for req in requests for p in range(len(req.prompts))),
                         key=lambda item: len(item[0].prompts[item[1]]))  # similar lengths: little padding
        chunk: list[tuple[_Request, int]] = []
        for item in [*prompts, None]:
            if chunk and (item is None or len(chunk) == PREFILL_ROWS
                          or (len(chunk) + 1) * len(item[0].prompts[item[1]]) > PREFILL_TOKENS):
                try:
                    self._prefill_chunk(batch, self.models[model_name].tokenizer, chunk)
                except Exception as e:  # a bug or out of memory: fail these requests, keep serving the others
                    log.exception("prefill failed")
                    for req, _ in chunk:
                        req.emit(Event("error", text=f"generation failed: {e}"))
                        req.cancelled = True
                chunk = []
            if item is not None:
                chunk.append(item)

    @torch.inference_mode()
    def _prefill_chunk(self, batch: _Batch, tokenizer, chunk: list[tuple[_Request, int]]) -> None:
        model, device = batch.model, batch.device
        chunk = [(req, p) for req, p in chunk if not req.cancelled]
        if not chunk:
            return
        prompts = [req.prompts[p] for req, p in chunk]
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        ids, mask = left_pad(prompts, pad)  # (m, Lj): one prompt alone runs unpadded, exactly as generate()
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        cache = model.new_cache(len(prompts), ids.shape[1])
        logits = model(ids, attention_mask=mask if padded else None, cache=cache, last_only=True).logits[:, -1]
        self.prefills += len(prompts)
        now = time.perf_counter()
        joiners = []
        for j, (req, p) in enumerate(chunk):
            if req.first_token_at is None:
                req.first_token_at = now
            rows = []
            for i in range(req.n):
                row = _Row(req, p * req.n + i, prompts[j], tokenizer, batch.context, logits.shape[-1], device)
                if row.budget <= 0:  # max_new_tokens 0: nothing to generate, as generate() does
                    row._finish("length", cut=False)
                    continue
                row.accept(row.pick(logits[j:j + 1]))  # (1, V)
                self.sampled += 1
                if not row.finished:
                    rows.append(row)
            if rows and not req.cancelled:
                joiners.append((rows, j))
        if joiners:
            batch.add(joiners, cache, mask)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            waiting, self._pending = list(self._pending), deque()
        running = [r.req for b in self._batches.values() for r in b.rows]
        for req in dict.fromkeys([*waiting, *running]):
            req.emit(Event("error", text=message))
            req.cancelled = True
        self._batches.clear()

    def stats(self) -> dict:
        """Queue and batch figures for /metrics and /health."""
        with self._cv:
            queued = len(self._pending)
        return {"queued": queued, "running": self.running_rows(), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "steps": self.steps, "step_rows": self.step_rows,
                "prefills": self.prefills, "sampled": self.sampled}
