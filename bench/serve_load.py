"""Load test of `featherlm serve`: concurrent streaming chat clients, batched decoding against one-at-a-time.

Starts `featherlm serve` (a subprocess, on a free loopback port) twice on the same model: once with
continuous batching (`--max-batch` = the number of clients) and once with `--max-batch 1` (every
request waits for the one before it: the same load served one request at a time). Each time,
``--clients`` streaming clients send chat requests back to back for ``--duration`` seconds. Reported
per run: completed requests/s, generated tokens/s, p50/p99 latency (request to last event), p50/p99
time to first token (request to the first content event), and failures (HTTP errors, error events,
broken streams: must be 0). Requests still running when the window closes are cancelled and reported
as ``unfinished`` (not failures). tokens/s is the server's count of tokens sampled during the window
(``featherlm_sampled_tokens_total`` in /metrics, so half-done requests count too);
``completed_tokens_per_s`` counts the usage of completed requests only.

Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos``), so both runs do the same work
per request; sampling is seeded per request.

    .venv/bin/python bench/serve_load.py [--clients 64] [--duration 60] [--max-tokens 64] [--dtype bfloat16]
                                         [--skip-baseline] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?", "Give me three tips for sleeping better.", "Explain photosynthesis simply.",
    "Write a haiku about the sea.", "What is a prime number?", "How do I boil an egg?",
    "Name three planets of the solar system.", "Why is the sky blue?", "Suggest a name for a small cat.",
    "What does a compiler do?", "Translate 'good morning' into Spanish.", "Summarise the story of Cinderella.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "featherlm.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max(64, 2 * args.clients))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start in 300 s")


async def one_request(client: httpx.AsyncClient, args, index: int) -> dict:
    """One streamed chat request; returns its timings and usage, or its failure."""
    body = {"model": args.model, "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": index,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"failed": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"failed": event["error"]["message"]}
            if event.get("usage"):
                usage = event["usage"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    if usage is None or first is None:
        return {"failed": "stream ended without content or usage"}
    return {"latency": end - start, "ttft": first - start, "tokens": usage["completion_tokens"]}


def server_counters(url: str) -> dict[str, float]:
    """The engine's cumulative counters from /metrics."""
    wanted = {"featherlm_sampled_tokens_total": "sampled", "featherlm_decode_steps_total": "steps",
              "featherlm_decode_rows_total": "rows"}
    found = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


async def load(url: str, args) -> dict:
    """``args.clients`` clients, each sending requests back to back until the window closes."""
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        warm = await one_request(client, args, 0)  # model caches, allocator, first-call costs
        if "failed" in warm:
            raise RuntimeError(f"warm-up request failed: {warm['failed']}")
        before = await asyncio.to_thread(server_counters, url)
        start = time.perf_counter()
        end = start + args.duration
        counter = iter(range(1, 10**9))

        async def worker() -> None:
            while time.perf_counter() < end:
                try:
                    results.append(await one_request(client, args, next(counter)))
                except httpx.HTTPError as e:
                    results.append({"failed": f"{type(e).__name__}: {e}"})

        tasks = [asyncio.create_task(worker()) for _ in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration)
        after = await asyncio.to_thread(server_counters, url)  # the window's work, unfinished requests included
        elapsed = time.perf_counter() - start
        for t in pending:  # requests still running when the window closes
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ok = [r for r in results if "failed" not in r]
    failed = [r["failed"] for r in results if "failed" in r]

    def pct(values: list[float], q: int) -> float | None:
        if len(values) < 2:
            return round(values[0], 3) if values else None  # no completed request: no figure
        return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)

    latency, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {
        "completed": len(ok), "failures": len(failed), "failure_examples": failed[:3], "unfinished": len(pending),
        "seconds": round(elapsed, 2), "requests_per_s": round(len(ok) / elapsed, 3),
        "tokens_per_s": round((after["sampled"] - before["sampled"]) / elapsed, 2),
        "completed_tokens_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 2),
        "mean_batch_rows": round((after["rows"] - before["rows"]) / max(after["steps"] - before["steps"], 1), 2),
        "latency_p50_s": pct(latency, 50), "latency_p99_s": pct(latency, 99),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
    }


def run(args, max_batch: int) -> dict:
    proc, url = start_server(args, max_batch)
    try:
        load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
        result = asyncio.run(load(url, args))
        return {"max_batch": max_batch, **result, "load_average": f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 (OpenAI's default): no sort of the vocabulary per row")
    p.add_argument("--skip-baseline", action="store_true", help="only the batched run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    runs = {"batched": run(args, args.clients)}
    if not args.skip_baseline:
        runs["one_at_a_time"] = run(args, 1)
        b, s = runs["batched"], runs["one_at_a_time"]
        runs["gain"] = {k: round(b[k] / s[k], 2) if s[k] else None for k in ("requests_per_s", "tokens_per_s")}
    settings = {k: getattr(args, k) for k in ("model", "dtype", "clients", "duration", "max_tokens", "temperature",
                                              "top_p")}
    if args.json:
        print(json.dumps({"settings": settings, **runs}))
        return 0
    print(f"{args.clients} streaming clients, {args.duration:.0f} s, {args.max_tokens} tokens per request, "
          f"{args.model} ({args.dtype})")
    keys = ["completed", "unfinished", "failures", "requests_per_s", "tokens_per_s", "completed_tokens_per_s",
            "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "mean_batch_rows", "load_average"]
    names = [n for n in ("batched", "one_at_a_time") if n in runs]
    print(f"{'':<24}" + "".join(f"{n:>16}" for n in names))
    for k in keys:
        print(f"{k:<24}" + "".join(f"{runs[n][k]:>16}" for n in names))
    if "gain" in runs:
        gain = runs["gain"]
        print(f"batching's gain: {gain['requests_per_s']}x requests/s, {gain['tokens_per_s']}x tokens/s")
    return 1 if any(runs[n]["failures"] for n in names) else 0


if __name__ == "__main__":
    sys.exit(main())
