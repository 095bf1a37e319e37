// featherlm web UI: chat with streaming, a playground for the task endpoints, and an attention view.
// Plain JavaScript, no build step and no outside files. Every API call goes through api() or chat(), which
// add the bearer key when one is set and turn OpenAI-style error bodies into readable messages.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const STORE = "featherlm.";

// ----------------------------------------------------------------------------------- API access

class APIError extends Error {}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const detail = body.error?.message ?? body.detail;
    if (detail) message = `${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) message += " (enter the server's API key at the top right)";
  return new APIError(message);
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

function showError(err) {
  $("#error-text").textContent = err instanceof APIError ? err.message : `Error: ${err.message ?? err}`;
  $("#error").hidden = false;
}

function clearError() {
  $("#error").hidden = true;
}

// Yields the data of each server-sent event ("data: ..." lines; events end with a blank line).
async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const parse = (event) => event.split("\n").filter((l) => l.startsWith("data:"))
    .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = parse(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (data) yield data;
    }
  }
  const rest = parse(buffer);
  if (rest) yield rest;
}

// ----------------------------------------------------------------------------------- page state

function persist() {
  for (const el of $$("[data-persist]")) {
    const saved = localStorage.getItem(STORE + el.id);
    if (saved !== null && el.tagName !== "SELECT") el.value = saved;
    el.addEventListener("change", () => localStorage.setItem(STORE + el.id, el.value));
  }
}

// Fills every model picker from /v1/models. featherlm's server says each model's task; a picker with
// data-tasks lists only those models (chat: decoders; classify: classification runs...), one with
// data-prefer lists that task first. Cards without a task (another server) fit every picker.
async function loadModels() {
  try {
    const cards = (await api("/v1/models")).data;
    for (const select of $$("select.model-select")) {
      const tasks = select.dataset.tasks?.split(" ");
      const prefer = (c) => (c.task === select.dataset.prefer ? 0 : 1);
      const names = cards.filter((c) => !tasks || c.task === undefined || tasks.includes(c.task))
        .sort((a, b) => prefer(a) - prefer(b)).map((c) => c.id);
      const keep = select.value || localStorage.getItem(STORE + select.id);
      select.disabled = !names.length;
      select.replaceChildren(...(names.length ? names.map((n) => new Option(n, n))
        : [new Option(`no ${tasks.join("/")} model served`, "")]));
      if (names.includes(keep)) select.value = keep;
    }
    clearError();
  } catch (err) {
    showError(err);
  }
}

function setupTabs() {
  const tabs = $$('[role="tab"]');
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
    }
    if (focus) tab.focus();
    history.replaceState(null, "", `#${tab.id.slice(4)}`);
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (to === undefined) return;
      e.preventDefault();
      select(tabs[(to + tabs.length) % tabs.length], true);
    });
  });
  const start = tabs.find((t) => `#${t.id.slice(4)}` === location.hash);
  if (start) select(start, false);
}

// ----------------------------------------------------------------------------------- chat

const conversation = []; // {role, content} of finished turns
let streaming = null; // the AbortController of the answer being streamed

function bubble(role, text, name) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = name;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("#messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function numberOr(id, fallback) {
  const v = $(`#${id}`).value.trim();
  return v === "" ? fallback : Number(v);
}

async function chat(text) {
  clearError();
  conversation.push({ role: "user", content: text });
  bubble("user", text, "You");
  const reply = bubble("assistant", "", $("#chat-model").value);
  const out = $(".text", reply);
  reply.dataset.sseCount = "0";
  reply.dataset.contentChunks = "0";
  reply.setAttribute("aria-busy", "true");
  const system = $("#system").value.trim();
  const body = {
    model: $("#chat-model").value,
    messages: system ? [{ role: "system", content: system }, ...conversation] : [...conversation],
    stream: true,
    temperature: numberOr("temperature", 0.7),
    top_p: numberOr("top_p", 1),
    max_tokens: numberOr("max_tokens", 256),
  };
  const seed = numberOr("seed", null);
  if (seed !== null) body.seed = seed;

  streaming = new AbortController();
  setStreaming(true);
  const started = performance.now();
  let answer = "";
  let count = 0; // server-sent events received
  let pieces = 0; // of them, those that carried text
  let finish = "";
  try {
    const response = await fetch("/v1/chat/completions",
      { method: "POST", headers: headers(), body: JSON.stringify(body), signal: streaming.signal });
    if (!response.ok) throw await errorFrom(response);
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(chunk.error.message);
      reply.dataset.sseCount = String(++count);
      const choice = chunk.choices?.[0] ?? {};
      if (choice.delta?.content) {
        reply.dataset.contentChunks = String(++pieces);
        answer += choice.delta.content;
        out.textContent = answer;
        reply.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else {
      finish = "error";
      showError(err);
    }
  } finally {
    streaming = null;
    setStreaming(false);
    reply.removeAttribute("aria-busy");
  }
  reply.dataset.finish = finish;
  const seconds = (performance.now() - started) / 1000;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `${pieces} chunks · ${seconds.toFixed(1)} s${finish ? ` · ${finish}` : ""}`;
  reply.append(meta);
  if (answer) conversation.push({ role: "assistant", content: answer });
  else if (finish === "error") { // nothing came back: take the turn out so the user can retry
    conversation.pop();
    reply.previousElementSibling.remove();
    reply.remove();
    if (!$("#chat-input").value) $("#chat-input").value = text;
  }
}

function setStreaming(on) {
  $("#send").disabled = on;
  $("#stop").disabled = !on;
}

function setupChat() {
  const input = $("#chat-input");
  $("#chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || streaming) return;
    input.value = "";
    chat(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("#chat-form").requestSubmit();
    }
  });
  $("#stop").addEventListener("click", () => streaming?.abort());
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") streaming?.abort(); });
  $("#new-chat").addEventListener("click", () => {
    streaming?.abort();
    conversation.length = 0;
    $("#messages").replaceChildren();
    input.focus();
  });
}

// ----------------------------------------------------------------------------------- task playground

const lines = (id) => $(`#${id}`).value.split("\n").map((s) => s.trim()).filter(Boolean);
const pct = (p) => `${(100 * p).toFixed(1)}%`;

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function meter(p) {
  return el("meter", { min: 0, max: 1, value: p, title: pct(p) });
}

// Marks [start, end) spans (offsets in Unicode code points, as Python counts them) inside a text.
function highlighted(text, spans) {
  const chars = Array.from(text);
  const out = el("p", { className: "marked" });
  let at = 0;
  for (const s of [...spans].sort((a, b) => a.start - b.start)) {
    if (s.start < at) continue; // overlapping span: keep the first
    out.append(chars.slice(at, s.start).join(""));
    const mark = el("mark", { title: s.title }, chars.slice(s.start, s.end).join(""));
    if (s.label) mark.append(el("span", { className: "tag" }, s.label));
    mark.dataset.type = s.label ?? "";
    out.append(mark);
    at = s.end;
  }
  out.append(chars.slice(at).join(""));
  return out;
}

// `scores` may be {label: p} or [{label, score}] or [p, ...]; returns [[label, p]] most likely first.
function scoreEntries(scores) {
  let entries = [];
  if (Array.isArray(scores)) {
    entries = scores.map((s, i) => (typeof s === "number" ? [String(i), s] : [s.label, s.score]));
  } else if (scores) entries = Object.entries(scores);
  return entries.sort((a, b) => b[1] - a[1]);
}

const TASKS = {
  classify: {
    body: () => ({ input: lines("classify-input") }),
    show(result, body) {
      const rows = result.data.map((d, i) => {
        const detail = el("details", {}, el("summary", {}, "all labels"),
          el("ul", {}, ...scoreEntries(d.scores).map(([l, p]) => el("li", {}, `${l} `, meter(p), ` ${pct(p)}`))));
        return el("tr", {}, el("td", {}, body.input[i]), el("td", {}, el("strong", {}, d.label)),
          el("td", {}, meter(d.score), ` ${pct(d.score)}`), el("td", {}, detail));
      });
      return el("table", {}, el("thead", {}, el("tr", {}, ...["Text", "Label", "Score", ""].map(
        (h) => el("th", { scope: "col" }, h)))), el("tbody", {}, ...rows));
    },
  },
  ner: {
    body: () => ({ input: lines("ner-input") }),
    show(result, body) {
      return el("div", {}, ...result.data.map((entities, i) => highlighted(body.input[i], entities.map((e) => ({
        start: e.start, end: e.end, label: e.type ?? e.entity, title: `${e.type ?? e.entity} ${pct(e.score)}`,
      })))));
    },
  },
  qa: {
    body: () => ({ question: $("#qa-question").value.trim(), context: $("#qa-context").value }),
    show(result, body) {
      return el("div", {},
        el("p", {}, "Answer: ", el("strong", { className: "answer" }, result.answer || "(none)"),
          ` (${pct(result.score)})`),
        highlighted(body.context, result.answer ? [{ start: result.start, end: result.end, title: "answer" }] : []));
    },
  },
  embeddings: {
    body: () => ({ input: lines("embeddings-input") }),
    show(result, body) {
      const vectors = result.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
      const norm = (v) => Math.hypot(...v) || 1;
      const cos = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0) / (norm(a) * norm(b));
      const head = el("tr", {}, el("th", { scope: "col" }, "cosine"),
        ...body.input.map((t, j) => el("th", { scope: "col", title: t }, `#${j + 1}`)));
      const rows = vectors.map((a, i) => el("tr", {}, el("th", { scope: "row", title: body.input[i] },
        `#${i + 1} ${body.input[i]}`), ...vectors.map((b) => el("td", {}, cos(a, b).toFixed(3)))));
      const preview = vectors.map((v, i) => el("li", {}, `#${i + 1}: [${v.slice(0, 6).map((x) => x.toFixed(3))
        .join(", ")}, …]`));
      return el("div", {}, el("p", {}, `${vectors.length} vectors of ${vectors[0]?.length ?? 0} dimensions`),
        el("ol", { className: "preview" }, ...preview),
        el("table", { className: "cosine" }, el("thead", {}, head), el("tbody", {}, ...rows)));
    },
  },
};

function setupTasks() {
  for (const [name, task] of Object.entries(TASKS)) {
    const form = $(`#${name}-form`);
    const out = $(`#${name}-result`);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      clearError();
      const button = $("button[type=submit]", form);
      button.disabled = true;
      out.setAttribute("aria-busy", "true");
      try {
        const body = { model: $(`#${name}-model`).value, ...task.body() };
        out.replaceChildren(task.show(await api(form.dataset.endpoint, body), body));
      } catch (err) {
        out.replaceChildren();
        showError(err);
      } finally {
        button.disabled = false;
        out.removeAttribute("aria-busy");
      }
    });
  }
}

// ----------------------------------------------------------------------------------- attention view

const visible = (token) => token.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";

function fillPicker(select, n, value) {
  if (select.options.length !== n) select.replaceChildren(...Array.from({ length: n }, (_, i) => new Option(i, i)));
  select.value = String(value);
}

// Rows are queries, columns keys. Usually both are the prompt's tokens; a prefix-tuning adapter adds key
// slots (result.key_tokens), so the map may be wider than tall.
function drawHeatmap(result) {
  const { weights } = result;
  const rows = result.tokens.map(visible);
  const cols = (result.key_tokens ?? result.tokens).map(visible);
  const map = $("#heatmap");
  const cell = Math.max(6, Math.min(28, Math.floor(560 / cols.length)));
  map.style.setProperty("--cell", `${cell}px`);
  map.style.setProperty("--cols", String(cols.length));
  map.classList.toggle("small", cell < 14);
  const parts = [el("div", { className: "corner" })];
  cols.forEach((t, k) => parts.push(el("div", { className: "col-label", title: `key ${k}: ${t}` }, t)));
  for (let q = 0; q < rows.length; q++) {
    parts.push(el("div", { className: "row-label", title: `query ${q}: ${rows[q]}` }, rows[q]));
    for (let k = 0; k < cols.length; k++) {
      const w = weights[q][k];
      const c = el("div", { className: w === 0 ? "cell zero" : "cell" });
      c.style.setProperty("--w", String(w));
      c.dataset.q = q;
      c.dataset.k = k;
      parts.push(c);
    }
  }
  map.replaceChildren(...parts);
  map.dataset.rows = String(rows.length);
  map.dataset.cols = String(cols.length);
  map.dataset.active = "";
  $("#heatmap-caption").textContent = `Layer ${result.layer} of ${result.n_layer}, head ${result.head} of `
    + `${result.n_head} (0-based), ${rows.length} tokens`;
  $("#heatmap-readout").textContent = "Point at a cell, or focus the map and use the arrow keys.";
  map._result = result;
}

function readCell(q, k) {
  const map = $("#heatmap");
  const r = map._result;
  if (!r) return;
  $(".cell.active", map)?.classList.remove("active");
  const c = $(`.cell[data-q="${q}"][data-k="${k}"]`, map);
  c.classList.add("active");
  map.dataset.active = `${q},${k}`;
  const key = (r.key_tokens ?? r.tokens)[k];
  $("#heatmap-readout").textContent = `query ${q} “${visible(r.tokens[q])}” → key ${k} “${visible(key)}”: `
    + `${r.weights[q][k].toFixed(4)}`;
}

function showNextTokens(result) {
  const rows = result.top.map((t) => {
    const token = el("button", { type: "button", className: "token", title: "append to the prompt" },
      visible(t.token));
    token.addEventListener("click", () => {
      $("#attention-text").value = t.text;
      $("#attention-form").requestSubmit();
    });
    return el("tr", {}, el("td", {}, token), el("td", {}, String(t.id)), el("td", {}, meter(t.prob), ` ${pct(t.prob)}`));
  });
  $("#next-tokens tbody").replaceChildren(...rows);
}

// Requests may finish out of order (a quick layer then head change sends two): only the latest request's
// answer is drawn, else a stale map would overwrite the chosen one and reset the pickers to its values.
let attentionRequests = 0;
let nextTokenRequests = 0;

async function runAttention(withNext) {
  clearError();
  const ticket = ++attentionRequests;
  const nextTicket = withNext ? ++nextTokenRequests : 0;
  const model = $("#attention-model").value;
  const text = $("#attention-text").value;
  const body = { model, text, layer: Number($("#attention-layer").value), head: Number($("#attention-head").value) };
  const next = withNext ? api("/v1/next_token", { model, text, top_k: 10 }) : null;
  try {
    const result = await api("/v1/attention", body);
    if (ticket === attentionRequests) {
      fillPicker($("#attention-layer"), result.n_layer, result.layer);
      fillPicker($("#attention-head"), result.n_head, result.head);
      drawHeatmap(result);
    }
  } catch (err) {
    if (ticket === attentionRequests) showError(err);
  }
  if (next) {
    try {
      const top = await next;
      if (nextTicket === nextTokenRequests) showNextTokens(top);
    } catch (err) { // encoders have no next token: say so in the table rather than as a page error
      if (nextTicket === nextTokenRequests) {
        $("#next-tokens tbody").replaceChildren(el("tr", {}, el("td", { colSpan: 3 }, err.message)));
      }
    }
  }
}

function setupAttention() {
  $("#attention-form").addEventListener("submit", (e) => {
    e.preventDefault();
    runAttention(true);
  });
  $("#attention-model").addEventListener("change", () => { // another model: its layer count may differ
    fillPicker($("#attention-layer"), 1, 0);
    fillPicker($("#attention-head"), 1, 0);
  });
  for (const id of ["attention-layer", "attention-head"]) {
    $(`#${id}`).addEventListener("change", () => { if ($("#heatmap")._result) runAttention(false); });
  }
  const map = $("#heatmap");
  map.addEventListener("pointerover", (e) => {
    if (e.target.classList.contains("cell")) readCell(Number(e.target.dataset.q), Number(e.target.dataset.k));
  });
  map.addEventListener("keydown", (e) => {
    const rows = Number(map.dataset.rows || 0);
    const cols = Number(map.dataset.cols || 0);
    const move = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] }[e.key];
    if (!rows || !move) return;
    e.preventDefault();
    if (!map.dataset.active) return readCell(0, 0);
    const [q, k] = map.dataset.active.split(",").map(Number);
    readCell(Math.min(rows - 1, Math.max(0, q + move[0])), Math.min(cols - 1, Math.max(0, k + move[1])));
  });
}

// ----------------------------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  const key = $("#api-key");
  key.value = localStorage.getItem(`${STORE}apiKey`) ?? "";
  const saveKey = () => {
    localStorage.setItem(`${STORE}apiKey`, key.value.trim());
    loadModels();
  };
  key.addEventListener("change", saveKey);
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    saveKey();
  });
  $("#error-close").addEventListener("click", clearError);
  persist();
  setupTabs();
  setupChat();
  setupTasks();
  setupAttention();
  loadModels().then(() => document.body.dataset.ready = "true");
});
