"""The continuous-batching engine: batched output equals each request decoded alone by
``featherlm.generate.generate`` (greedy and seeded sampling), whatever joins or leaves the batch when.

Most tests drive an engine that was never started, calling ``run_once`` themselves so that requests
join at chosen steps; one test runs the background thread with concurrent submitters.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import pytest
import torch

from featherlm.errors import GenerationError
from featherlm.generate import GenerationConfig, generate, generate_ids
from featherlm.peft import PeftConfig, apply
from featherlm.serve import Engine, QueueFull
from featherlm.serve.registry import LoadedModel, load_model


@dataclass
class Result:
    events: list = field(default_factory=list)

    def __call__(self, event) -> None:  # the engine's sink
        self.events.append(event)

    def text(self, index: int = 0) -> str:
        return "".join(e.text for e in self.events if e.kind == "text" and e.index == index)

    def finish(self, index: int = 0):
        return next(e for e in self.events if e.kind == "finish" and e.index == index)

    @property
    def done(self):
        return next((e for e in self.events if e.kind == "done"), None)


@pytest.fixture(scope="module")
def lm(tiny_folder) -> LoadedModel:
    return load_model(str(tiny_folder), "float32")


@pytest.fixture(scope="module")
def short_lm(tiny_chat_folder, words) -> LoadedModel:
    """Context 40: rows reach the end of the context, so the engine must drop the batch's left padding."""
    return load_model(str(tiny_chat_folder(words, context=40, seed=1)), "float32")


def prompt(lm, n_words: int, seed: int) -> list[int]:
    """Random words of the tiny vocabulary (ids 1.. are words; 0 is <unk>, the specials come last)."""
    g = torch.Generator().manual_seed(seed)
    n_vocab = lm.tokenizer.vocab_size - 2
    return torch.randint(1, n_vocab, (n_words,), generator=g).tolist()


def drain(engine: Engine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not engine.running_rows() and not engine.stats()["queued"]:
            return
        engine.run_once()
    raise AssertionError("the engine did not finish")


def assert_alone(lm, ids, cfg, result: Result, index: int = 0) -> None:
    alone = generate(lm.model, lm.tokenizer, ids, copy.deepcopy(cfg))
    assert result.text(index) == alone.text
    assert result.finish(index).finish_reason == alone.finish_reason
    assert result.finish(index).tokens == len(alone.token_ids)


def test_greedy_batched_with_joins_and_leaves_equals_alone(lm):
    engine = Engine({"m": lm}, max_batch=16)
    lengths = [3, 12, 1, 30, 7, 18]  # later prompts longer than the batch: it shifts right to take them
    budgets = [40, 5, 60, 20, 33, 9]  # short ones leave while others run: the last rows move into the holes
    requests = [(prompt(lm, n, seed=i), GenerationConfig(max_new_tokens=b)) for i, (n, b) in
                enumerate(zip(lengths, budgets, strict=True))]
    results = [Result() for _ in requests]
    join_at = [0, 0, 2, 3, 3, 9]  # iteration at which each request is submitted
    for step in range(max(join_at) + 1):
        for i, at in enumerate(join_at):
            if at == step:
                engine.submit("m", [requests[i][0]], requests[i][1], results[i])
        engine.run_once()
    drain(engine)
    assert engine.step_rows > engine.steps  # rows really were decoded together
    for (ids, cfg), result in zip(requests, results, strict=True):
        assert_alone(lm, ids, cfg, result)
        assert result.done.prompt_tokens == len(ids)
        assert result.done.completion_tokens == result.finish().tokens
        assert result.done.ttft is not None and result.done.ttft >= 0


def test_padding_left_by_finished_rows_is_dropped_at_the_context_end(short_lm):
    """A long prompt pads a short one; after the long one leaves, the short row runs to the end of the
    40-token context, which only fits once the batch drops the padding columns (30 + 38 > 40)."""
    engine = Engine({"m": short_lm}, max_batch=4)
    long_ids, short_ids = prompt(short_lm, 30, seed=1), prompt(short_lm, 2, seed=2)
    cfg_long, cfg_short = GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=100)
    a, b = Result(), Result()
    engine.submit("m", [long_ids], cfg_long, a, ignore_eos=True)
    engine.run_once()
    engine.submit("m", [short_ids], cfg_short, b, ignore_eos=True)
    drain(engine)
    for ids, cfg, result in ((long_ids, cfg_long, a), (short_ids, cfg_short, b)):
        alone = generate_ids(short_lm.model, [ids], cfg, eos_ids=frozenset(), pad_id=0)[0]  # no end token
        assert result.text() == short_lm.tokenizer.decode(alone)
        assert result.finish().tokens == len(alone)
    assert b.finish().tokens == 40 - len(short_ids)  # up to the context's end
    assert b.finish().finish_reason == "length"


def test_seeded_sampling_honours_each_rows_settings(lm):
    engine = Engine({"m": lm}, max_batch=8)
    configs = [GenerationConfig(max_new_tokens=25, temperature=0.9, seed=1),
               GenerationConfig(max_new_tokens=25, temperature=1.3, top_p=0.8, seed=2),
               GenerationConfig(max_new_tokens=25, temperature=0.7, top_k=5, seed=3),
               GenerationConfig(max_new_tokens=25, temperature=1.0, min_p=0.1, repetition_penalty=1.3, seed=4),
               GenerationConfig(max_new_tokens=25)]  # greedy in the same batch
    prompts = [prompt(lm, 4 + 3 * i, seed=10 + i) for i in range(len(configs))]
    results = [Result() for _ in configs]
    for i, (ids, cfg) in enumerate(zip(prompts, configs, strict=True)):
        engine.submit("m", [ids], cfg, results[i])
        engine.run_once()  # staggered: each joins a batch already running
    drain(engine)
    for ids, cfg, result in zip(prompts, configs, results, strict=True):
        assert_alone(lm, ids, cfg, result)


def test_n_choices_share_the_prompt_and_differ(lm):
    engine = Engine({"m": lm}, max_batch=8)
    ids = prompt(lm, 6, seed=3)
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=7)
    result = Result()
    engine.submit("m", [ids], cfg, result, n=3)
    drain(engine)
    assert_alone(lm, ids, cfg, result, index=0)  # the first choice uses the request's seed as such
    texts = {result.text(i) for i in range(3)}
    assert len(texts) == 3  # the others use seed + i
    assert engine.prefills == 1  # one prefill for the three rows
    assert result.done.prompt_tokens == len(ids)  # counted once, as OpenAI does
    assert result.done.completion_tokens == sum(result.finish(i).tokens for i in range(3))


def test_stop_strings_cut_cleanly_in_a_batch(lm):
    ids = prompt(lm, 5, seed=5)
    plain = generate(lm.model, lm.tokenizer, ids, GenerationConfig(max_new_tokens=30)).text
    words = plain.split()
    assert len(words) > 6, plain
    stop = " ".join(words[3:5])  # two words from the middle of the greedy answer
    cfg = GenerationConfig(max_new_tokens=30, stop=["nothing like this", stop])
    engine = Engine({"m": lm}, max_batch=4)
    other, result = Result(), Result()
    engine.submit("m", [prompt(lm, 9, seed=5)], GenerationConfig(max_new_tokens=30), other)
    engine.run_once()
    engine.submit("m", [ids], cfg, result)
    drain(engine)
    assert_alone(lm, ids, cfg, result)
    assert result.finish().finish_reason == "stop"
    # the streamed pieces add up to the answer up to the stop string: no piece of it was ever shown
    assert stop not in result.text() and plain.startswith(result.text()) and len(result.text()) < len(plain)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_style_adapters_batch_like_alone(lm, method):
    """Prompt tuning keeps virtual tokens at the front of the cache; prefix tuning adds keys/values to
    every layer: both must survive joins, shifts and row moves."""
    torch.manual_seed(0)
    model = apply(copy.deepcopy(lm.model), PeftConfig(method=method, num_virtual_tokens=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # away from any init that could act as a no-op
                p.normal_(0.0, 0.5)
    adapted = LoadedModel(model, lm.tokenizer, "adapted")
    engine = Engine({"m": adapted}, max_batch=8)
    requests = [(prompt(lm, n, seed=20 + n), GenerationConfig(max_new_tokens=b)) for n, b in
                [(4, 12), (15, 25), (2, 30)]]
    results = [Result() for _ in requests]
    for (ids, cfg), result in zip(requests, results, strict=True):
        engine.submit("m", [ids], cfg, result)
        engine.run_once()
        engine.run_once()
    drain(engine)
    for (ids, cfg), result in zip(requests, results, strict=True):
        assert_alone(adapted, ids, cfg, result)
    assert results[0].text() != generate(lm.model, lm.tokenizer, requests[0][0], requests[0][1]).text


def test_cancel_frees_the_rows_and_the_queue_place(lm):
    engine = Engine({"m": lm}, max_batch=2, max_queue=1)
    long_cfg = GenerationConfig(max_new_tokens=200)
    running = engine.submit("m", [prompt(lm, 3, 1)], long_cfg, Result(), ignore_eos=True)
    engine.run_once()
    assert engine.running_rows() == 1
    waiting = engine.submit("m", [prompt(lm, 3, 2)], long_cfg, Result(), n=2)  # needs 2 rows: waits
    engine.run_once()
    assert engine.stats()["queued"] == 1
    with pytest.raises(QueueFull):
        engine.submit("m", [prompt(lm, 3, 3)], long_cfg, Result())
    waiting.cancel()
    assert engine.stats()["queued"] == 0
    late = Result()
    engine.submit("m", [prompt(lm, 3, 4)], GenerationConfig(max_new_tokens=5), late)  # the place is free again
    running.cancel()
    engine.run_once()  # the cancelled row leaves at the start of the step
    drain(engine)
    assert late.done is not None and engine.running_rows() == 0


def test_zero_new_tokens_finishes_at_once_like_generate(lm):
    engine = Engine({"m": lm})
    ids, cfg, result = prompt(lm, 4, seed=6), GenerationConfig(max_new_tokens=0), Result()
    engine.submit("m", [ids], cfg, result)
    drain(engine)
    assert_alone(lm, ids, cfg, result)
    assert result.done.completion_tokens == 0 and engine.steps == 0


def test_bad_requests_raise_before_queueing(lm):
    engine = Engine({"m": lm})
    with pytest.raises(KeyError):
        engine.submit("other", [[1]], GenerationConfig(), Result())
    with pytest.raises(GenerationError, match="context"):
        engine.submit("m", [[1] * 256], GenerationConfig(), Result())
    with pytest.raises(GenerationError):
        engine.submit("m", [[]], GenerationConfig(), Result())
    with pytest.raises(GenerationError):
        engine.submit("m", [[1]], GenerationConfig(temperature=-1), Result())
    assert engine.stats()["queued"] == 0


def test_background_thread_batches_concurrent_requests(lm):
    engine = Engine({"m": lm}, max_batch=8).start()
    try:
        requests = [(prompt(lm, 2 + i, seed=40 + i), GenerationConfig(max_new_tokens=30)) for i in range(6)]
        results = [Result() for _ in requests]
        finished = [threading.Event() for _ in requests]

        def sink(i):
            def put(event):
                results[i](event)
                if event.kind in ("done", "error"):
                    finished[i].set()
            return put

        threads = [threading.Thread(target=engine.submit, args=("m", [ids], cfg, sink(i)), kwargs={"ignore_eos": True})
                   for i, (ids, cfg) in enumerate(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(f.wait(60) for f in finished)
    finally:
        engine.stop()
    for result in results:
        assert result.finish().tokens == 30  # ignore_eos: every row runs to max_new_tokens
    assert engine.step_rows > engine.steps  # at least some steps decoded several rows


def test_batch_size_one_serves_one_request_at_a_time(lm):
    engine = Engine({"m": lm}, max_batch=1)
    results = [Result() for _ in range(3)]
    for i, result in enumerate(results):
        engine.submit("m", [prompt(lm, 3, 50 + i)], GenerationConfig(max_new_tokens=8), result, ignore_eos=True)
    drain(engine)
    assert engine.step_rows == engine.steps == 3 * 7  # the first token of each comes from its prefill
    assert engine.sampled == 3 * 8
    assert all(r.finish().tokens == 8 for r in results)
