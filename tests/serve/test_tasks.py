"""The task endpoints /v1/ner and /v1/qa over HTTP (a real uvicorn server on loopback), and the OpenAPI
document of every task endpoint.

The runs are tests/serve/conftest.py's ``ner_run`` and ``qa_run`` (a tiny BERT with MiniLM's WordPiece
tokenizer, LoRA, toy data). What the server must answer is computed in the test process with
``featherlm.evaluate.predict_entities`` / ``answer_questions`` on the same merged weights.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from featherlm.evaluate import answer_questions, predict_entities

ENTITY_KEYS = {"entity", "type", "start", "end", "text", "score"}


def post(server, path: str, body=None, *, content: bytes | None = None, key: str | None = "server"):
    key = server.api_key if key == "server" else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


def merged_run(run_dir):
    """The run as the server holds it: LoRA merged into the weights, float32, eval mode."""
    from featherlm.peft import merge
    from featherlm.train import load_run

    model, tokenizer, config = load_run(run_dir)
    return merge(model).eval(), tokenizer, config


def close(got: list[dict], expected: list[dict]) -> bool:
    """Same entities / answers; scores equal up to float rounding."""
    strip = [[{k: v for k, v in d.items() if k != "score"} for d in x] for x in (got, expected)]
    return strip[0] == strip[1] and all(g["score"] == pytest.approx(e["score"], abs=1e-5)
                                        for g, e in zip(got, expected, strict=True))


# ----------------------------------------------------------------------------- /v1/ner

NER_TEXTS = [
    "today Johansson saw a big crowd near Timbuktu .",
    "😀 the news said that 🇫🇷 Reykjavik , then",  # emoji: offsets count code points, as Python indexes strings
    " ".join(["the crowd said that we saw a big river ."] * 6 + ["then Fitzgerald saw Kathmandu"]),  # many windows
    "",
]


def test_ner_route_equals_predict_entities_and_spans_index_the_text(task_server, ner_run):
    model, tokenizer, config = merged_run(ner_run)
    expected = predict_entities(model, tokenizer, NER_TEXTS, max_seq_len=config.train.max_seq_len)
    r = post(task_server, "/v1/ner", {"model": "bert:ner", "input": NER_TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["object"], body["model"]) == ("list", "bert:ner")
    data = body["data"]
    assert len(data) == len(NER_TEXTS)
    for got, want in zip(data, expected, strict=True):
        assert close(got, want)
    for text, entities in zip(NER_TEXTS, data, strict=True):
        for e in entities:
            assert set(e) == ENTITY_KEYS, e
            assert 0 <= e["start"] < e["end"] <= len(text) and text[e["start"]:e["end"]] == e["text"]
            assert e["type"] == e["entity"] and e["type"] in {"PER", "LOC"} and 0 < e["score"] <= 1
    found = [{(e["type"], e["text"]) for e in entities} for entities in data]
    assert {("PER", "Johansson"), ("LOC", "Timbuktu")} <= found[0]  # the run learnt the toy pattern
    assert ("LOC", "Reykjavik") in found[1]  # after two emoji (3 code points, 6 UTF-16 units)
    far = [e for e in data[2] if e["text"] == "Kathmandu"]
    assert far and far[0]["start"] == NER_TEXTS[2].index("Kathmandu") > 200  # beyond the first 32-token window
    assert data[3] == []  # an empty text has no entities (and is no error)
    # one text in, one list out; an adapter may be named alone when its name is unique
    one = post(task_server, "/v1/ner", {"model": "ner", "input": NER_TEXTS[0]}).json()
    assert one["model"] == "bert:ner" and len(one["data"]) == 1 and close(one["data"][0], data[0])


# ----------------------------------------------------------------------------- /v1/qa

QA_CASES = [
    ("what is the capital ?", "we saw a big crowd and the capital is Reykjavik . then the news said"),
    ("what is the capital ?", "😀 today 🇫🇷 the capital is Timbuktu . and then"),
    ("what is the capital ?", " ".join(["the news said that we saw a big crowd near the river ."] * 5)
     + " the capital is Kathmandu . then"),  # far beyond the first 48-token window
]


@pytest.mark.parametrize("question,context", QA_CASES, ids=["short", "emoji", "long"])
def test_qa_answer_is_the_span_of_the_context_at_its_offsets(task_server, qa_run, question, context):
    model, tokenizer, config = merged_run(qa_run)
    d = config.data
    (expected,) = answer_questions(model, tokenizer, [question], [context], max_seq_len=config.train.max_seq_len,
                                   doc_stride=d.doc_stride, max_answer_len=d.max_answer_len,
                                   allow_null=d.unanswerable == "null")
    r = post(task_server, "/v1/qa", {"model": "bert:qa", "question": question, "context": context})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "answer", "start", "end", "score"} and body["model"] == "bert:qa"
    assert close([{k: body[k] for k in ("answer", "start", "end", "score")}], [expected])
    assert context[body["start"]:body["end"]] == body["answer"] and 0 < body["score"] <= 1
    place = context.split("the capital is ")[1].split()[0]
    assert body["answer"] == place  # the run learnt the toy pattern
    assert body["start"] == context.index("the capital is ") + len("the capital is ")


# ----------------------------------------------------------------------------- wrong models, bad bodies

BAD_TASK_REQUESTS = [
    ("ner with a qa run", "/v1/ner", {"model": "bert:qa", "input": "a"}, 400, "wrong_model_task"),
    ("ner with a classification run", "/v1/ner", {"model": "sst", "input": "a"}, 400, "wrong_model_task"),
    ("ner with a base encoder", "/v1/ner", {"model": "bert", "input": "a"}, 400, "wrong_model_task"),
    ("ner with a decoder", "/v1/ner", {"model": "tiny", "input": "a"}, 400, "wrong_model_task"),
    ("qa with an ner run", "/v1/qa", {"model": "bert:ner", "question": "a", "context": "b"}, 400,
     "wrong_model_task"),
    ("classify with an ner run", "/v1/classify", {"model": "bert:ner", "input": "a"}, 400, "wrong_model_task"),
    ("ner with an unknown adapter", "/v1/ner", {"model": "bert:nope", "input": "a"}, 404, "model_not_found"),
    ("qa with an unknown model", "/v1/qa", {"model": "nope", "question": "a", "context": "b"}, 404,
     "model_not_found"),
    ("ner with a path", "/v1/ner", {"model": "/tmp", "input": "a"}, 404, "model_not_found"),
    ("qa without a context", "/v1/qa", {"model": "bert:qa", "question": "a"}, 400, "invalid_value"),
    ("qa context of the wrong type", "/v1/qa", {"model": "bert:qa", "question": "a", "context": 5}, 400,
     "invalid_value"),
    ("ner with token ids", "/v1/ner", {"model": "bert:ner", "input": [1, 2]}, 400, "invalid_value"),
    ("ner of no texts", "/v1/ner", {"model": "bert:ner", "input": []}, 400, None),
    ("ner with malformed JSON", "/v1/ner", b'{"model": "bert:ner", "input": ', 400, "invalid_json"),
    ("qa with malformed JSON", "/v1/qa", b"{question", 400, "invalid_json"),
]


@pytest.mark.parametrize("path,body,status,code", [b[1:] for b in BAD_TASK_REQUESTS],
                         ids=[b[0] for b in BAD_TASK_REQUESTS])
def test_wrong_models_and_bad_bodies_get_openai_errors(task_server, path, body, status, code):
    r = post(task_server, path, content=body) if isinstance(body, bytes) else post(task_server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    if code in ("wrong_model_task", "model_not_found"):
        assert error["param"] == "model"


def test_task_endpoints_need_the_api_key(task_server):
    for path, body in (("/v1/ner", {"model": "bert:ner", "input": "a"}),
                       ("/v1/qa", {"model": "bert:qa", "question": "a", "context": "b"})):
        for key in (None, "wrong"):
            r = post(task_server, path, body, key=key)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_task_runs_backbone_still_serves_direct_forward_passes(task_server, task_registry):
    """An NER run's entry holds its backbone as a plain Transformer: the UI's attention view reads it."""
    lm = task_registry.get("bert:ner")
    r = post(task_server, "/v1/attention", {"model": "bert:ner", "text": "today Johansson saw", "layer": 1})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        maps = lm.model(torch.tensor([lm.tokenizer.encode("today Johansson saw")]), output_attentions=True).attentions
    torch.testing.assert_close(torch.tensor(r.json()["weights"]), maps[1][0, 0])


# ----------------------------------------------------------------------------- the OpenAPI document


def test_openapi_documents_the_task_and_embedding_schemas(task_server):
    r = httpx.get(task_server.url + "/openapi.json", headers=task_server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    components = doc["components"]["schemas"]

    def target(schema: dict) -> str:
        ref = schema["$ref"]
        assert ref.startswith("#/components/schemas/")
        name = ref.rsplit("/", 1)[1]
        assert name in components
        return name

    for path, request, response in (("/v1/classify", "TextsRequest", "ClassifyResponse"),
                                    ("/v1/ner", "TextsRequest", "NerResponse"),
                                    ("/v1/qa", "QARequest", "QAResponse"),
                                    ("/v1/embeddings", "EmbeddingRequest", "EmbeddingList")):
        op = doc["paths"][path]["post"]
        assert target(op["requestBody"]["content"]["application/json"]["schema"]) == request, path
        assert op["requestBody"]["required"] is True
        assert target(op["responses"]["200"]["content"]["application/json"]["schema"]) == response, path
        for status in ("400", "404"):
            assert target(op["responses"][status]["content"]["application/json"]["schema"]) == "ErrorResponse"
        assert op.get("description") or op.get("summary")

    def fields(name: str) -> tuple[set, set]:
        return set(components[name]["properties"]), set(components[name].get("required", []))

    assert fields("QARequest") == ({"model", "question", "context"}, {"model", "question", "context"})
    props, required = fields("QAResponse")
    assert {"answer", "start", "end", "score"} <= required and "model" in props
    assert fields("TextsRequest")[1] == {"model", "input"}
    ner_items = components["NerResponse"]["properties"]["data"]["items"]["items"]
    assert target(ner_items) == "Entity" and ENTITY_KEYS <= fields("Entity")[1]
    assert target(components["ClassifyResponse"]["properties"]["data"]["items"]) == "ClassLabel"
    assert {"label", "score", "scores"} <= fields("ClassLabel")[1]
    assert {"model", "input"} <= fields("EmbeddingRequest")[1]
    assert target(components["EmbeddingList"]["properties"]["data"]["items"]) == "Embedding"
    # /docs renders that document (it needs the key like every route but /health and the UI)
    docs = httpx.get(task_server.url + "/docs", headers=task_server.headers(), timeout=30)
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    # ... from this server's own files: nothing on the page comes from another host (it must work offline)
    assert "http://" not in docs.text and "https://" not in docs.text and "//cdn" not in docs.text
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert asset in docs.text
        served = httpx.get(task_server.url + asset, headers=task_server.headers(), timeout=30)
        assert served.status_code == 200 and len(served.content) > 10_000, asset
