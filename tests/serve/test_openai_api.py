"""The HTTP API against real uvicorn servers on loopback, with the official ``openai`` package as the client.

What a served answer must equal is computed directly in the test process with ``featherlm.generate``,
``featherlm.train.load_run`` and ``featherlm.evaluate.classify`` on the same weights.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from featherlm.cli import main
from featherlm.errors import ConfigError
from featherlm.generate import GenerationConfig, generate
from featherlm.model import Transformer
from featherlm.serve import ModelRegistry
from featherlm.serve.registry import LoadedModel, load_model


def greedy(lm, prompt, max_tokens: int, **options):
    return generate(lm.model, lm.tokenizer, prompt, GenerationConfig(max_new_tokens=max_tokens, **options))


def call(server, method: str, path: str, body=None, *, content: bytes | None = None, key: str | None = "server"):
    """A raw HTTP call; ``key``: "server" sends the server's key, None none, else that key."""
    key = server.api_key if key == "server" else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.request(method, server.url + path, json=body, content=content, headers=headers, timeout=60)


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def chat_prompt(lm, messages) -> str:
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# ----------------------------------------------------------------------------- models and generation


def test_models_are_listed_with_adapters(server, registry):
    client = server.client()
    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny", "minilm-l6", "tiny:chat", "sst"]
    chat = client.models.retrieve("tiny:chat")
    assert (chat.id, chat.model_extra["base"], chat.model_extra["adapter"], chat.model_extra["task"]) == (
        "tiny:chat", "tiny", "chat", "sft")
    assert {m.id: m.model_extra["decoder"] for m in listed} == {"tiny": True, "minilm-l6": False, "tiny:chat": True,
                                                                "sst": False}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_generate_alone(server, registry):
    lm = registry.get("tiny")
    r = server.client().completions.create(model="tiny", prompt="say the movie was good", max_tokens=20, temperature=0)
    alone = greedy(lm, "say the movie was good", 20)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == alone.text and r.choices[0].finish_reason == alone.finish_reason
    prompt_tokens = len(lm.tokenizer.encode("say the movie was good"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens, len(alone.token_ids), prompt_tokens + len(alone.token_ids))


def test_several_prompts_n_seed_and_stop(server, registry):
    lm = registry.get("tiny")
    prompts = ["hello world", "the plot was dull"]
    r = server.client().completions.create(model="tiny", prompt=prompts, n=2, max_tokens=12, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt i, sample j -> index i * n + j
    for i, p in enumerate(prompts):  # the first sample of each prompt uses the seed itself
        assert r.choices[2 * i].text == greedy(lm, p, 12, temperature=1.0, seed=11).text
    text = next(p for p in ("say hello", "hello world", "the movie", "a good film", "it was bad", "the story")
                if len(greedy(lm, p, 30).text.split()) >= 4)  # a prompt whose answer has a few words
    stop = greedy(lm, text, 30).text.split()[2]
    cut = server.client().completions.create(model="tiny", prompt=text, max_tokens=30, temperature=0, stop=stop)
    assert cut.choices[0].text == greedy(lm, text, 30, stop=[stop]).text
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_streamed_chat_equals_the_full_answer(server, registry):
    lm = registry.get("tiny")
    messages = [{"role": "system", "content": "say yes"}, {"role": "user", "content": "hello world"}]
    client = server.client()
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    alone = greedy(lm, chat_prompt(lm, messages), 25)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == alone.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [alone.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone.token_ids)
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0)
    assert full.choices[0].message.content == alone.text and full.choices[0].message.role == "assistant"
    # the wire format itself: `data: {...}` events, the last one `data: [DONE]`
    raw = call(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 5,
                                                         "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_adapter_is_chosen_by_the_model_field(server, registry, sft_run):
    from featherlm.peft import merge
    from featherlm.train import load_run

    model, tokenizer, _ = load_run(sft_run)
    run = LoadedModel(merge(model), tokenizer, "run")
    messages = [{"role": "user", "content": "say the film was lovely"}]
    expected = greedy(run, chat_prompt(run, messages), 10).text
    assert expected != greedy(registry.get("tiny"), chat_prompt(run, messages), 10).text  # the adapter matters
    client = server.client()
    for name in ("tiny:chat", "chat"):  # an adapter may be named alone when the name is unique
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == expected and r.model == "tiny:chat"


# ----------------------------------------------------------------------------- embeddings and tasks


TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome for kids."]


def mean_pooled(lm, text: str) -> torch.Tensor:
    """The embedding computed directly: one unpadded text, mean over its tokens, unit length."""
    with torch.no_grad():
        hidden = lm.model(torch.tensor([lm.tokenizer.encode(text)])).hidden[0]  # (T, C)
    return F.normalize(hidden.mean(0), dim=-1)


def test_embeddings_are_normalised_mean_pools(server, registry):
    lm = registry.get("minilm-l6")
    client = server.client()
    r = client.embeddings.create(model="minilm-l6", input=TEXTS)
    got = torch.tensor([d.embedding for d in r.data])
    assert got.shape == (3, 384) and [d.index for d in r.data] == [0, 1, 2]
    expected = torch.stack([mean_pooled(lm, t) for t in TEXTS])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # padding and batching change nothing
    assert got[0] @ got[1] > got[0] @ got[2]  # eating food is closer to eating bread than to a movie
    assert r.usage.prompt_tokens == sum(len(lm.tokenizer.encode(t)) for t in TEXTS)
    one = client.embeddings.create(model="minilm-l6", input=TEXTS[1])
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), got[1], atol=1e-6, rtol=1e-6)
    b64 = call(server, "POST", "/v1/embeddings", {"model": "minilm-l6", "input": TEXTS[0],
                                                   "encoding_format": "base64"}).json()
    decoded = torch.frombuffer(bytearray(base64.b64decode(b64["data"][0]["embedding"])), dtype=torch.float32)
    torch.testing.assert_close(decoded, got[0])


@pytest.mark.slow
def test_embeddings_equal_transformers_mean_pooling(server):
    """The reference: transformers' BertModel on the same folder, pooled as sentence-transformers does."""
    from transformers import AutoModel, AutoTokenizer

    from featherlm.hub import resolve

    folder = resolve("minilm-l6")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    got = torch.tensor([d.embedding for d in server.client().embeddings.create(model="minilm-l6", input=TEXTS).data])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_classify_route_equals_classify(server, classify_run):
    from featherlm.evaluate import classify
    from featherlm.train import load_run

    model, tokenizer, config = load_run(classify_run)
    texts = ["the movie was great", "a dull and poor plot", "it is lovely"]
    expected = classify(model, tokenizer, texts, max_seq_len=config.train.max_seq_len)
    r = call(server, "POST", "/v1/classify", {"model": "sst", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["label"] for d in data] == [e["label"] for e in expected]
    for d, e in zip(data, expected, strict=True):
        assert d["score"] == pytest.approx(e["score"], abs=1e-5)
        assert d["scores"] == pytest.approx(e["scores"], abs=1e-5)
    one = call(server, "POST", "/v1/classify", {"model": "sst", "input": texts[0]}).json()["data"]
    assert len(one) == 1 and one[0]["label"] == expected[0]["label"]


# ----------------------------------------------------------------------------- bad input


BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("body not an object", "/v1/completions", b'[1, 2]', 400, None),
    ("no body", "/v1/chat/completions", b"", 400, None),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("temperature of the wrong type", "/v1/completions", {"model": "tiny", "prompt": "a", "temperature": "hot"}, 400,
     "temperature"),
    ("messages not a list", "/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    # wrong JSON types are refused, not converted (as OpenAI does): a bool, a string or a float for an integer
    ("max_tokens a bool", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens a float", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 10.0}, 400,
     "max_tokens"),
    ("n a string", "/v1/completions", {"model": "tiny", "prompt": "a", "n": "2"}, 400, "n"),
    ("stream a string", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "stream": "yes"}, 400, "stream"),
    ("prompt of bools", "/v1/completions", {"model": "tiny", "prompt": [True, False]}, 400, "prompt"),
    ("prompt a number", "/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("model not a string", "/v1/completions", {"model": ["tiny"], "prompt": "a"}, 400, "model"),
    ("embedding input a number", "/v1/embeddings", {"model": "minilm-l6", "input": 5}, 400, "input"),
    ("unknown role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]},
     400, "messages"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("unknown adapter", "/v1/chat/completions", {"model": "tiny:nope", "messages": [{"role": "user", "content": "a"}]},
     404, "model"),
    ("a path as model", "/v1/completions", {"model": "/etc/passwd", "prompt": "a"}, 404, "model"),
    ("max_tokens beyond the limit", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("prompt longer than the context", "/v1/completions", {"model": "tiny", "prompt": "hello " * 300}, 400, "prompt"),
    ("token prompt longer than the context", "/v1/completions", {"model": "tiny", "prompt": [1] * 256}, 400, "prompt"),
    ("max_completion_tokens beyond the limit", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 10**6}, 400,
     "max_tokens"),
    ("chat longer than the context", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hello " * 300}]}, 400, "messages"),
    ("absurd n", "/v1/completions", {"model": "tiny", "prompt": "a", "n": 100}, 400, "n"),
    ("absurd n in a chat", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 10**9}, 400, "n"),
    ("n zero", "/v1/completions", {"model": "tiny", "prompt": "a", "n": 0}, 400, "n"),
    ("too many rows", "/v1/completions", {"model": "tiny", "prompt": ["a"] * 16, "n": 8}, 400, "n"),
    ("negative temperature", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("too many stop strings", "/v1/completions", {"model": "tiny", "prompt": "a", "stop": list("abcde")}, 400, "stop"),
    ("token id out of range", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("logprobs", "/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 3}, 400, "logprobs"),
    ("chat with an encoder", "/v1/chat/completions",
     {"model": "minilm-l6", "messages": [{"role": "user", "content": "a"}]}, 400, "model"),
    ("embeddings of nothing", "/v1/embeddings", {"model": "minilm-l6", "input": []}, 400, "input"),
    ("classify with a decoder", "/v1/classify", {"model": "tiny", "input": "a"}, 400, "model"),
    ("ner with a classification run", "/v1/ner", {"model": "sst", "input": "a"}, 400, "model"),
    ("qa with a classification run", "/v1/qa", {"model": "sst", "question": "a", "context": "b"}, 400, "model"),
    ("unknown route", "/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_with_an_openai_error_body(server, path, body, status, param):
    if isinstance(body, bytes):
        r = call(server, "POST", path, content=body)
    else:
        r = call(server, "POST", path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


def test_a_prompt_at_the_context_edge_gets_the_room_that_is_left(server):
    """256-token context: a 255-token prompt is served (one new token fits), 256 tokens are a 400 (above)."""
    r = server.client().completions.create(model="tiny", prompt=[5] * 255, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.choices[0].finish_reason) == (255, 1, "length")


def test_openai_client_sees_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="tiny:nope", messages=[{"role": "user", "content": "a"}])
    assert "nope" in e.value.body["message"] and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a", n=9)
    assert e.value.body["param"] == "n"
    assert server.client().completions.create(model="tiny", prompt="a", max_tokens=1).choices  # still serving


# ----------------------------------------------------------------------------- auth, health, metrics


def test_api_key_is_required_except_for_health_and_the_ui(server):
    assert call(server, "GET", "/health", key=None).json()["status"] == "ok"
    for key in (None, "wrong-key", server.api_key + "x", ""):
        r = call(server, "GET", "/v1/models", key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "a"}, key=None).status_code == 401
    assert call(server, "GET", "/metrics", key=None).status_code == 401
    assert call(server, "GET", "/docs", key=None).status_code == 401
    assert call(server, "GET", "/", key=None).status_code != 401  # the UI page (404 without the UI module)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    schema = call(server, "GET", "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/ner",
            "/v1/qa"} <= set(schema["paths"])
    names = {"ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "ClassifyResponse", "ErrorResponse"}
    assert names <= set(schema["components"]["schemas"])


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? '
                    r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def scrape(server) -> dict[str, float]:
    text = call(server, "GET", "/metrics").text
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_count_requests_tokens_and_latency(server):
    before = scrape(server)
    r = server.client().completions.create(model="tiny", prompt="hello", max_tokens=7, temperature=0)
    after = scrape(server)
    ok = 'featherlm_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[ok] == before.get(ok, 0) + 1
    tokens = 'featherlm_generated_tokens_total{model="tiny"}'
    assert after[tokens] == before.get(tokens, 0) + r.usage.completion_tokens
    count = 'featherlm_time_to_first_token_seconds_count{model="tiny"}'
    assert after[count] == before.get(count, 0) + 1
    latency = 'featherlm_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'
    assert after[latency] == before.get(latency, 0) + 1
    assert "featherlm_queue_depth" in after and "featherlm_batch_rows" in after
    call(server, "POST", "/v1/completions", {"model": "nope", "prompt": "a"})
    assert scrape(server)['featherlm_requests_total{endpoint="/v1/completions",status="404"}'] >= 1


# ----------------------------------------------------------------------------- load: queue and disconnects


class Slow(Transformer):
    """The tiny model, 20 ms slower per forward pass: requests last long enough to overlap reliably."""

    def forward(self, *args, **kwargs):
        time.sleep(0.02)
        return super().forward(*args, **kwargs)


@pytest.fixture(scope="module")
def slow_registry(registry) -> ModelRegistry:
    lm = registry.get("tiny")
    slow = Slow(lm.model.config)
    slow.load_state_dict(lm.model.state_dict())
    reg = ModelRegistry()
    reg.add("slow", LoadedModel(slow.eval(), lm.tokenizer, "slow"))
    return reg


def long_stream(client, prompt: str = "hello"):
    return client.completions.create(model="slow", prompt=prompt, max_tokens=200, temperature=0, stream=True,
                                     extra_body={"ignore_eos": True})


def test_a_full_queue_answers_429(start_server, slow_registry):
    server = start_server(slow_registry, max_batch=1, max_queue=1)
    client = server.client()
    first = long_stream(client)
    next(iter(first))  # a first token: the request holds the only batch row
    second = long_stream(client, "world")  # waits in the queue (the stream's headers come at once)
    assert wait_for(lambda: server.engine.stats()["queued"] == 1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="slow", prompt="a", max_tokens=2)
    assert e.value.status_code == 429 and e.value.code == "queue_full"
    first.close()
    second.close()
    assert wait_for(lambda: server.engine.stats()["queued"] == 0 and server.engine.running_rows() == 0)


def test_a_client_that_disconnects_frees_its_row(start_server, slow_registry):
    server = start_server(slow_registry, max_batch=1, max_queue=4)
    client = server.client()
    stream = long_stream(client)
    pieces = iter(stream)
    next(pieces), next(pieces)
    stream.close()  # drops the connection mid-stream
    assert wait_for(lambda: server.engine.running_rows() == 0, timeout=10)
    assert server.engine.steps < 100  # cancelled long before its 200 tokens (20 ms a step)
    r = client.completions.create(model="slow", prompt="a", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    # a non-streamed request whose client goes away is cancelled as well
    steps = server.engine.steps
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
        httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "a", "max_tokens": 200,
                                                         "ignore_eos": True}, timeout=0.5)
    assert wait_for(lambda: server.engine.running_rows() == 0, timeout=10)
    assert server.engine.steps - steps < 100


def test_concurrent_requests_share_batches_and_each_equals_alone(start_server, slow_registry, registry):
    server = start_server(slow_registry, max_batch=8)
    client = server.client()
    prompts = ["hello world", "say the movie was dull", "the plot", "a very good film and a lovely story"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.completions.create(model="slow", prompt=prompts[i], max_tokens=15, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lm = registry.get("tiny")
    assert results == {i: greedy(lm, p, 15).text for i, p in enumerate(prompts)}
    assert server.engine.step_rows > server.engine.steps  # some steps decoded several requests


# ----------------------------------------------------------------------------- the real SmolLM2, and the CLI


def test_real_smollm2_chat_through_the_server(start_server):
    registry = ModelRegistry.load(["smollm2-135m-instruct"], dtype="bfloat16")
    server = start_server(registry)
    lm = registry.get("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = server.client().chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=10,
                                                temperature=0)
    alone = greedy(lm, chat_prompt(lm, messages), 10)
    assert r.choices[0].message.content == alone.text
    assert "Paris" in alone.text
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(chat_prompt(lm, messages)))


def test_cli_refuses_a_public_address_without_an_api_key(capsys, monkeypatch):
    monkeypatch.delenv("FEATHERLM_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "featherlm serve: error:" in err and "--api-key" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2


def test_cli_passes_its_flags_to_serve(monkeypatch):
    import featherlm.serve

    seen = {}
    monkeypatch.setattr(featherlm.serve, "serve", lambda **kwargs: seen.update(kwargs))
    assert main(["serve", "--model", "smollm2-135m-instruct", "--model", "e=minilm-l6", "--adapter", "a=runs/x",
                 "--host", "0.0.0.0", "--port", "9001", "--api-key", "k", "--max-batch", "4"]) == 0
    assert seen["models"] == ["smollm2-135m-instruct", "e=minilm-l6"] and seen["adapters"] == {"a": "runs/x"}
    assert (seen["host"], seen["port"], seen["api_key"], seen["max_batch"], seen["dtype"]) == (
        "0.0.0.0", 9001, "k", 4, "bfloat16")
    assert main(["serve", "--host", "10.0.0.1", "--insecure"]) == 0 and seen["models"] == ["smollm2-135m-instruct"]


def test_load_model_refuses_an_unknown_dtype(tiny_folder):
    with pytest.raises(ConfigError, match="dtype"):
        load_model(str(tiny_folder), "int3")


# ----------------------------------------------------------------------------- every route, binding, body size


def test_every_route_but_health_and_the_ui_needs_the_key_compared_in_constant_time(server, monkeypatch):
    """Walk the app's own route table, so a route added later cannot be left open by mistake."""
    import hmac

    from fastapi.routing import APIRoute
    from starlette.routing import Mount

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    public, guarded = [], []
    for route in server.app.routes:
        if isinstance(route, Mount):  # /static: the UI's assets (public); /docs/assets: the API page's (guarded)
            assert route.path in ("/static", "/docs/assets")
            if route.path == "/static":
                public.append(("GET", "/static/app.js"))
            else:
                guarded.append(("GET", "/docs/assets/swagger-ui.css"))
            continue
        path = route.path.replace("{model:path}", "tiny")
        for method in sorted(route.methods - {"HEAD"}):
            (public if path in ("/health", "/") else guarded).append((method, path))
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/ner", "/v1/qa",
            "/v1/models", "/v1/models/tiny", "/metrics", "/openapi.json", "/docs", "/v1/attention",
            "/v1/next_token"} <= {p for _, p in guarded}
    assert all(isinstance(r, (APIRoute, Mount)) or r.path in ("/openapi.json", "/docs") for r in server.app.routes)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for method, path in guarded:
            body = {} if method == "POST" else None
            for key in (None, "wrong-key", server.api_key[:-1] + "X"):  # the last: same length, one byte off
                compared.clear()
                r = http.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {})
                assert r.status_code == 401, (method, path, key, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
                if key:
                    assert compared == [(key.encode(), server.api_key.encode())], (method, path)
            assert http.request(method, path, json=body, headers=server.headers()).status_code != 401, (method, path)
        for method, path in public:
            assert http.request(method, path).status_code == 200, path


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("LocalHost", True), ("0.0.0.0", False),
                                           ("::", False), ("192.168.1.20", False), ("example.com", False),
                                           ("localhost.example.com", False), ("", False)])
def test_a_non_loopback_bind_needs_an_api_key_or_insecure(host, loopback):
    from featherlm.serve import check_bind, is_loopback

    assert is_loopback(host) is loopback
    check_bind(host, "key", insecure=False)
    check_bind(host, None, insecure=True)
    if loopback:
        check_bind(host, None, insecure=False)
    else:
        with pytest.raises(ConfigError, match="--api-key"):
            check_bind(host, None, insecure=False)
        with pytest.raises(ConfigError, match="--api-key"):
            check_bind(host, "", insecure=False)  # an empty key is no key


def test_serve_refuses_a_public_bind_before_loading_anything(monkeypatch):
    import uvicorn

    import featherlm.serve
    from featherlm.serve import registry as registry_module

    def never(*args, **kwargs):
        raise AssertionError("nothing may be loaded or bound")

    monkeypatch.setattr(uvicorn, "run", never)
    monkeypatch.setattr(registry_module, "load_model", never)
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0"):
        featherlm.serve.serve(["smollm2-135m-instruct"], host="0.0.0.0")
    with pytest.raises(ConfigError, match="refusing"):
        featherlm.serve.serve(["smollm2-135m-instruct"], host="::", api_key=None)


def test_a_body_without_content_length_is_limited_too(start_server, registry):
    from featherlm.serve import Limits

    server = start_server(registry, limits=Limits(max_body_bytes=2000))
    text = "hello " * 1000  # 6 kB

    def chunks():  # a generator body: httpx sends it chunked, without a Content-Length
        yield json.dumps({"model": "minilm-l6", "input": text}).encode()

    for content in (chunks(), json.dumps({"model": "minilm-l6", "input": text}).encode()):
        r = httpx.post(server.url + "/v1/embeddings", content=content, headers={"Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "body_too_large"
    small = httpx.post(server.url + "/v1/embeddings", content=iter([b'{"model": "minilm-l6", "input": "hello"}']),
                       headers={"Content-Type": "application/json"}, timeout=30)
    assert small.status_code == 200 and len(small.json()["data"][0]["embedding"]) == 384


# ----------------------------------------------------------------------------- encoder-decoder models (T5)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A random tiny T5 with a word-level tokenizer laid out as T5's (<pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    from featherlm.checkpoint import save_model
    from featherlm.config import preset
    from featherlm.model import new_model
    from featherlm.tokenizer import Tokenizer

    vocab = ["<pad>", "</s>", "<unk>", "translate", ":", "hello", "world", "bonjour", "monde"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    torch.manual_seed(0)
    model = new_model(preset("t5", vocab_size=len(vocab), d_model=32, n_head=4, d_ff=64, relative_buckets=8,
                             relative_max_distance=16))
    folder = tmp_path_factory.mktemp("tiny_t5")
    save_model(model, Tokenizer(backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"), folder)
    return folder


def test_an_encoder_decoder_model_is_refused_at_load_with_a_clear_error(t5_folder, tiny_folder, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("a T5 server must not start"))
    with pytest.raises(ConfigError, match=r"encoder-decoder models \(T5\) cannot be served yet") as e:
        ModelRegistry.load([f"tiny={tiny_folder}", f"t5={t5_folder}"], dtype="float32")
    assert str(e.value).startswith("t5: ") and f"featherlm generate --model {t5_folder}" in str(e.value)
    assert main(["serve", "--model", str(t5_folder), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featherlm serve: error: ") and "encoder-decoder" in err
    assert len(err.strip().splitlines()) == 1  # one line, no stack trace
    # `featherlm generate`, which the message points at, does generate with it
    assert main(["generate", "--model", str(t5_folder), "--prompt", "translate : hello", "--max-new-tokens", "3",
                 "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt_tokens"] == 4


def test_a_run_on_an_encoder_decoder_model_is_refused_at_load(t5_folder, tmp_path):
    from featherlm.train import finetune

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                            for s, t in [("hello", "bonjour"), ("world", "monde"), ("hello world", "bonjour monde")]))
    finetune({"model": {"name": str(t5_folder), "task": "translation"},
              "data": {"train": str(data), "prompt": "translate : {source}"},
              "peft": {"method": "lora", "r": 4}, "train": {"max_steps": 1, "batch_size": 2, "max_seq_len": 16},
              "out": {"dir": str(tmp_path / "run"), "plot": False}}, progress=False)
    with pytest.raises(ConfigError, match="translation run is on an encoder-decoder model") as e:
        ModelRegistry.load([], {"fr": str(tmp_path / "run")}, dtype="float32")
    assert "featherlm generate --adapter" in str(e.value)
