"""The web UI: the page and its assets, the /v1/attention and /v1/next_token routes, and a real browser
(Debian's chromium driven by Playwright) chatting with a live server and drawing an attention map."""

from __future__ import annotations

import copy
import re
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from featherlm.generate import GenerationConfig, generate
from featherlm.serve import create_app
from featherlm.serve.ui import MAX_ATTENTION_TOKENS, MAX_TOP_K, STATIC

TEXT = "the movie was good but the plot is a very dull story"  # words of the served tiny model's vocabulary


@pytest.fixture(scope="module")
def client(registry):
    """The real app (tests/serve/conftest.py's registry: ``tiny`` Llama, ``minilm-l6`` BERT...) in-process."""
    with TestClient(create_app(registry)) as c:
        yield c


@pytest.fixture(scope="module")
def lm(registry):
    return registry.get("tiny")


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ----------------------------------------------------------------------------- /v1/attention


def test_attention_is_the_models_own_map_causal_with_rows_summing_to_one(client, lm):
    ids = lm.tokenizer.encode(TEXT)
    T = len(ids)
    with torch.no_grad():
        maps = lm.model(torch.tensor([ids]), output_attentions=True).attentions  # n_layer x (1, H, T, T)
    cfg = lm.model.config
    for layer in range(cfg.n_layer):
        for head in range(cfg.n_head):
            r = client.post("/v1/attention", json={"model": "tiny", "text": TEXT, "layer": layer, "head": head})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["tokens"] == TEXT.split() and body["key_tokens"] is None
            assert (body["n_layer"], body["n_head"], body["layer"], body["head"]) == (cfg.n_layer, cfg.n_head,
                                                                                      layer, head)
            w = torch.tensor(body["weights"])
            assert w.shape == (T, T)
            torch.testing.assert_close(w.sum(-1), torch.ones(T))
            assert (w.triu(1) == 0).all()  # a decoder never looks ahead
            assert (w.tril(-1) > 0).any()  # and does look back
            torch.testing.assert_close(w, maps[layer][0, head])
    # different heads really are different maps (a route ignoring `head` would fail here)
    first, second = (client.post("/v1/attention", json={"model": "tiny", "text": TEXT, "head": h}).json()["weights"]
                     for h in (0, 1))
    assert first != second


def test_attention_of_an_encoder_is_bidirectional(client):
    r = client.post("/v1/attention", json={"model": "minilm-l6", "text": TEXT, "layer": 1, "head": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"][0] == "[CLS]" and body["tokens"][-1] == "[SEP]"  # special tokens shown by name
    assert (body["n_layer"], body["n_head"]) == (6, 12)  # all-MiniLM-L6-v2
    w = torch.tensor(body["weights"])
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
    future = torch.ones_like(w, dtype=torch.bool).triu(1)
    assert (w[future] > 0).all()  # every query sees the keys after it too


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_attention_labels_the_positions_prompt_style_adapters_add(method, lm):
    """Prompt tuning runs P virtual tokens before the prompt (rows and columns); prefix tuning adds P key/value
    slots (columns only). The map must stay a probability table with a label for every row and column."""
    from featherlm.peft import apply
    from featherlm.peft.base import PeftConfig
    from featherlm.serve import ModelRegistry
    from featherlm.serve.registry import LoadedModel

    P = 3
    model = apply(copy.deepcopy(lm.model), PeftConfig(method=method, num_virtual_tokens=P)).eval()
    registry = ModelRegistry()
    registry.add("tuned", LoadedModel(model, lm.tokenizer, "tuned"))
    with TestClient(create_app(registry)) as c:
        r = c.post("/v1/attention", json={"model": "tuned", "text": TEXT, "layer": 1, "head": 1})
    assert r.status_code == 200, r.text
    body, words = r.json(), TEXT.split()
    w = torch.tensor(body["weights"])
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
    assert w.shape == (len(body["tokens"]), len(body["key_tokens"] or body["tokens"]))
    if method == "prompt":
        assert body["tokens"] == [f"<virtual {i}>" for i in range(P)] + words and body["key_tokens"] is None
    else:
        assert body["tokens"] == words
        assert body["key_tokens"] == [f"<prefix {i}>" for i in range(P)] + words
        assert (w[:, :P] > 0).all()  # every query sees the prefix


def test_attention_rejects_bad_input(client, lm):
    cfg = lm.model.config
    ok = {"model": "tiny", "text": TEXT}
    error = assert_error(client.post("/v1/attention", json={**ok, "model": "nope"}), 404, "model")
    assert error["code"] == "model_not_found" and "tiny" in error["message"]  # names what is served
    assert_error(client.post("/v1/attention", json={**ok, "text": ""}), 400, "text")
    assert_error(client.post("/v1/attention", json={**ok, "text": "  \n "}), 400, "text")
    assert_error(client.post("/v1/attention", json={**ok, "layer": cfg.n_layer}), 400, "layer")
    assert_error(client.post("/v1/attention", json={**ok, "layer": -1}), 400, "layer")
    assert_error(client.post("/v1/attention", json={**ok, "head": cfg.n_head}), 400, "head")
    limit = min(MAX_ATTENTION_TOKENS, cfg.max_seq_len)
    assert client.post("/v1/attention", json={**ok, "text": " ".join(["the"] * limit)}).status_code == 200
    error = assert_error(client.post("/v1/attention", json={**ok, "text": " ".join(["the"] * (limit + 1))}), 400)
    assert error["code"] == "context_length_exceeded"


# ----------------------------------------------------------------------------- /v1/next_token


def test_next_token_is_the_softmax_of_the_last_logits(client, lm):
    ids = lm.tokenizer.encode(TEXT)
    with torch.no_grad():
        probs = lm.model(torch.tensor([ids])).logits[0, -1].softmax(-1)  # (V,)
    r = client.post("/v1/next_token", json={"model": "tiny", "text": TEXT, "top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == TEXT.split()
    expected = probs.topk(5)
    assert [t["id"] for t in body["top"]] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor([t["prob"] for t in body["top"]]), expected.values)
    assert [t["token"] for t in body["top"]] == [lm.tokenizer.decode([i], skip_special_tokens=False)
                                              for i in expected.indices.tolist()]
    for t in body["top"]:  # the prompt that clicking the token makes: the prompt's ids and this one
        assert lm.tokenizer.encode(t["text"]) == [*ids, t["id"]]
    # default top_k is 10, and the largest allowed returns that many rows
    assert len(client.post("/v1/next_token", json={"model": "tiny", "text": TEXT}).json()["top"]) == 10
    full = client.post("/v1/next_token", json={"model": "tiny", "text": TEXT, "top_k": MAX_TOP_K}).json()["top"]
    assert len(full) == min(MAX_TOP_K, lm.tokenizer.vocab_size)


def test_next_token_of_chat_messages_uses_the_chat_template(client, lm):
    messages = [{"role": "user", "content": "hello world"}]
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    by_messages = client.post("/v1/next_token", json={"model": "tiny", "messages": messages}).json()
    by_text = client.post("/v1/next_token", json={"model": "tiny", "text": prompt}).json()
    assert by_messages == by_text
    assert by_messages["tokens"][0] == "<|im_start|>" and by_messages["tokens"][-1] == "assistant"


def test_next_token_rejects_bad_input(client, lm):
    ok = {"model": "tiny", "text": TEXT}
    assert_error(client.post("/v1/next_token", json={**ok, "model": "nope"}), 404, "model")
    assert_error(client.post("/v1/next_token", json={**ok, "text": ""}), 400, "text")
    assert_error(client.post("/v1/next_token", json={"model": "tiny"}), 400)
    assert_error(client.post("/v1/next_token", json={**ok, "messages": [{"role": "user", "content": "hi"}]}), 400)
    assert_error(client.post("/v1/next_token", json={"model": "tiny", "messages": []}), 400, "messages")
    assert_error(client.post("/v1/next_token", json={**ok, "top_k": 0}), 400, "top_k")
    assert_error(client.post("/v1/next_token", json={**ok, "top_k": MAX_TOP_K + 1}), 400, "top_k")
    too_long = " ".join(["the"] * (lm.model.config.max_seq_len + 1))
    assert_error(client.post("/v1/next_token", json={**ok, "text": too_long}), 400, "text")
    error = assert_error(client.post("/v1/next_token", json={**ok, "model": "minilm-l6"}), 400, "model")
    assert "encoder" in error["message"]


# ----------------------------------------------------------------------------- the page and its assets


def test_page_and_assets_are_served_and_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert f"/static/{name}" in page.text
    assert client.get("/static/missing.js").status_code == 404
    # nothing from the internet: no absolute or protocol-relative URLs in any asset
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}", text), path.name
        assert "@import" not in text and "url(" not in text, path.name


def test_every_element_the_script_looks_up_exists_in_the_page():
    page = (STATIC / "index.html").read_text()
    script = (STATIC / "app.js").read_text()
    ids = set(re.findall(r'id="([\w-]+)"', page))
    wanted = set(re.findall(r'\$\("#([\w-]+)', script))
    wanted |= {f"{task}-{part}" for task in ("classify", "ner", "qa", "embeddings") for part in ("form", "result",
                                                                                                "model")}
    assert wanted and not wanted - ids, sorted(wanted - ids)
    for label_for in re.findall(r'<label for="([\w-]+)"', page):  # labels point at real controls
        assert label_for in ids


def test_ui_routes_need_the_key_when_the_server_has_one(registry):
    with TestClient(create_app(registry, api_key="sesame")) as c:
        body = {"model": "tiny", "text": TEXT}
        for path in ("/v1/attention", "/v1/next_token"):
            assert_error(c.post(path, json=body), 401)
            assert_error(c.post(path, json=body, headers={"Authorization": "Bearer wrong"}), 401)
            assert c.post(path, json=body, headers={"Authorization": "Bearer sesame"}).status_code == 200
        # the page and its assets are public: the page asks for the key and sends it itself
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


def test_malformed_requests_get_openai_error_bodies(client):
    assert_error(client.post("/v1/attention", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400)
    assert_error(client.post("/v1/attention", json={"model": "tiny", "text": TEXT, "layer": "first"}), 400, "layer")
    assert_error(client.post("/v1/attention", json={"model": "tiny"}), 400, "text")
    assert_error(client.post("/v1/next_token", json={"model": "tiny", "text": TEXT, "top_k": 2.5}), 400, "top_k")


# ----------------------------------------------------------------------------- a real browser


def _weights(page) -> list[list[float]]:
    """The heat map's cells as the page drew them: each cell's --w (its colour's alpha) by row."""
    return page.evaluate("""() => {
        const rows = [];
        for (const c of document.querySelectorAll('#heatmap .cell')) {
            (rows[c.dataset.q] ??= [])[c.dataset.k] = Number(c.style.getPropertyValue('--w'));
        }
        return rows;
    }""")


def test_browser_chats_with_streaming_and_draws_attention(registry, start_server, server, tmp_path, monkeypatch):
    """Chromium loads the page from a live server, streams a chat answer, runs the task and attention
    views, and (against a server with a key) shows the 401 until the key is entered."""
    from playwright.sync_api import expect, sync_playwright

    open_server = start_server(registry)  # no API key: the page must work without one
    lm = registry.get("tiny")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            crashes: list[str] = []
            page.on("pageerror", lambda e: crashes.append(str(e)))
            page.goto(open_server.url + "/")
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            expect(page.locator("#error")).to_be_hidden()
            # the chat picker lists only the models that generate
            assert page.locator("#chat-model option").all_inner_texts() == ["tiny", "tiny:chat"]

            # ----- chat: greedy, so the streamed answer must be the model's own greedy answer
            page.select_option("#chat-model", "tiny")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#chat-input", "hello world")
            page.press("#chat-input", "Enter")
            reply = page.locator(".msg.assistant").last
            expect(reply.locator(".text")).not_to_be_empty()
            expect(reply).to_have_attribute("data-finish", re.compile(r"^(stop|length)$"))
            streamed = reply.locator(".text").text_content()
            prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}])
            expected = generate(lm.model, lm.tokenizer, prompt, GenerationConfig(max_new_tokens=12)).text
            assert streamed == expected and len(expected.split()) > 1
            assert int(reply.get_attribute("data-content-chunks")) > 1  # it arrived in pieces
            assert int(reply.get_attribute("data-sse-count")) >= int(reply.get_attribute("data-content-chunks"))
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_disabled()
            page.screenshot(path=tmp_path / "chat.png")

            # ----- stop: with the model slowed to ~20 tokens/s, Stop aborts the stream mid-answer
            forward = lm.model.forward

            def slow_forward(*args, **kwargs):
                time.sleep(0.05)
                return forward(*args, **kwargs)

            monkeypatch.setattr(lm.model, "forward", slow_forward)
            page.fill("#max_tokens", "200")
            page.fill("#chat-input", "say hello")
            page.click("#send")
            second = page.locator(".msg.assistant").nth(1)
            expect(second).to_have_attribute("data-content-chunks", re.compile(r"^[1-9]"))
            page.click("#stop")
            expect(second).to_have_attribute("data-finish", "stopped")
            assert 1 <= int(second.get_attribute("data-content-chunks")) < 100
            assert second.locator(".text").text_content()  # the partial answer stays in the conversation
            expect(page.locator("#send")).to_be_enabled()
            deadline = time.monotonic() + 10  # the server notices the closed connection and frees the row
            while open_server.engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert open_server.engine.stats()["running"] == 0
            monkeypatch.undo()

            # ----- task playground: a classification run and the MiniLM embeddings
            page.click("#tab-tasks")
            expect(page.locator("#classify-model")).to_have_value("sst")
            page.fill("#classify-input", "the movie was good\nthe plot was awful")
            page.click("#classify-form button[type=submit]")
            expect(page.locator("#classify-result tbody tr")).to_have_count(2)
            page.select_option("#embeddings-model", "minilm-l6")
            page.fill("#embeddings-input", "the movie was good\nthe film was good\nworld")
            page.click("#embeddings-form button[type=submit]")
            expect(page.locator("#embeddings-result")).to_contain_text("3 vectors of 384 dimensions")
            diagonal = page.locator("#embeddings-result .cosine tbody tr").nth(1).locator("td").nth(1)
            expect(diagonal).to_have_text("1.000")

            # NER and QA need runs this registry lacks: answer in their documented shapes, to check that the
            # page marks the spans Python's offsets (code points, not JavaScript's UTF-16 units) point at
            expect(page.locator("#ner-model")).to_be_disabled()  # no NER run served, and the picker says so
            text = "😀 Angela Merkel visited Paris 🇫🇷 today"
            spans = [(m.start(), m.end(), kind) for m, kind in ((re.search("Angela Merkel", text), "PER"),
                                                               (re.search("Paris", text), "LOC"))]
            entities = [{"entity": k, "type": k, "start": a, "end": b, "text": text[a:b], "score": 0.9}
                        for a, b, k in spans]
            page.route("**/v1/ner", lambda route: route.fulfill(json={"object": "list", "data": [entities]}))
            page.fill("#ner-input", text)
            page.click("#ner-form button[type=submit]")
            marks = page.locator("#ner-result mark")
            expect(marks).to_have_count(2)
            assert [m.get_attribute("data-type") for m in marks.all()] == ["PER", "LOC"]
            assert [m.evaluate("m => m.firstChild.textContent") for m in marks.all()] == ["Angela Merkel", "Paris"]
            a, b = spans[1][:2]
            page.route("**/v1/qa", lambda route: route.fulfill(json={"answer": text[a:b], "start": a, "end": b,
                                                                     "score": 0.5}))
            page.fill("#qa-question", "Where did she go?")
            page.fill("#qa-context", text)
            page.click("#qa-form button[type=submit]")
            expect(page.locator("#qa-result .answer")).to_have_text("Paris")
            expect(page.locator("#qa-result mark")).to_have_text("Paris")

            # ----- attention: the heat map draws exactly the weights of the chosen layer and head
            page.click("#tab-attention")
            page.select_option("#attention-model", "tiny")
            page.fill("#attention-text", TEXT)
            page.click("#attention-form button[type=submit]")
            T = len(TEXT.split())
            expect(page.locator("#heatmap .cell")).to_have_count(T * T)
            expect(page.locator("#next-tokens tbody tr")).to_have_count(10)
            ids = torch.tensor([lm.tokenizer.encode(TEXT)])
            with torch.no_grad():
                maps = lm.model(ids, output_attentions=True).attentions
            torch.testing.assert_close(torch.tensor(_weights(page)), maps[0][0, 0])
            box = page.locator("#heatmap .cell").first.bounding_box()
            assert box and box["width"] >= 6 and box["height"] >= 6  # laid out, not just in the DOM
            # picking a layer then a head sends two requests; the first (head 0) is made to answer last, and
            # the page must still show the head picked last rather than the stale map
            import featherlm.serve.ui as ui

            stale = threading.Event()

            def slow_for_head_0(registry, body):
                if (body.layer, body.head) == (1, 0):
                    stale.set()
                    time.sleep(0.6)
                return attention_map(registry, body)

            attention_map = ui.attention_map
            monkeypatch.setattr(ui, "attention_map", slow_for_head_0)
            page.select_option("#attention-layer", "1")
            page.select_option("#attention-head", "3")
            expect(page.locator("#heatmap-caption")).to_contain_text("Layer 1 of 2, head 3 of 4")
            assert stale.wait(5)
            time.sleep(0.8)  # the stale answer has arrived by now, and must have changed nothing
            expect(page.locator("#heatmap-caption")).to_contain_text("Layer 1 of 2, head 3 of 4")
            assert page.input_value("#attention-head") == "3"
            monkeypatch.undo()
            torch.testing.assert_close(torch.tensor(_weights(page)), maps[1][0, 3])
            page.focus("#heatmap")  # keyboard: arrows walk the cells and the readout says the weight
            for key in ("ArrowDown", "ArrowDown", "ArrowRight"):
                page.keyboard.press(key)
            expect(page.locator("#heatmap-readout")).to_contain_text(f"{maps[1][0, 3, 1, 1].item():.4f}")
            page.screenshot(path=tmp_path / "attention.png", full_page=True)
            page.locator("#next-tokens button.token").first.click()  # step: append the likeliest token
            expect(page.locator("#heatmap .cell")).to_have_count((T + 1) ** 2)
            assert page.input_value("#attention-text").startswith(TEXT + " ")

            # ----- a server with a key: the 401 shows in the page until the key is entered
            page.goto(server.url + "/")
            expect(page.locator("#error")).to_be_visible()
            expect(page.locator("#error-text")).to_contain_text("401")
            page.fill("#api-key", server.api_key)
            page.press("#api-key", "Enter")
            expect(page.locator("#error")).to_be_hidden()
            expect(page.locator("#chat-model option")).to_have_count(2)
            assert crashes == []
        finally:
            browser.close()
    for name in ("chat.png", "attention.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000, (name, len(png))
