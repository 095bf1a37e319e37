"""Evaluation suites: entries run in order through the EVALUATORS registry, results tables written
atomically, a failing entry becomes an error row, a malformed suite names its file and line."""

from __future__ import annotations

import json
import random

import pytest
import yaml

import featherlm
from featherlm.errors import ConfigError
from featherlm.evaluate import evaluate
from featherlm.evaluate.perplexity import perplexity
from featherlm.evaluate.suite import EVALUATORS, read_suite, register, run_suite
from featherlm.peft import merge
from featherlm.train import finetune, load_run

WORDS = ["the", "king", "queen", "said", "and", "to", "my", "lord", "is", "good", "night", "thou", "art", "of"]


def write_suite(path, entries) -> str:
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def lm_setup(tiny_chat_folder, tmp_path_factory):
    """(model folder, text file, an lm fine-tuning run on it) for a tiny random Llama."""
    folder = tiny_chat_folder(WORDS, context=64, seed=1)
    tmp = tmp_path_factory.mktemp("suite")
    rng = random.Random(0)
    text = tmp / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(12)) + "\n")
    run = tmp / "run"
    finetune({"model": {"name": str(folder), "task": "lm"}, "data": {"train": str(text), "eval": str(text)},
              "peft": {"method": "lora", "r": 4}, "train": {"max_steps": 3, "batch_size": 4, "max_seq_len": 32},
              "out": {"dir": str(run), "plot": False}}, progress=False)
    return str(folder), str(text), str(run)


def test_runs_entries_and_writes_both_tables(tmp_path, lm_setup):
    folder, text, run = lm_setup
    suite = write_suite(tmp_path / "suite.yaml", [
        {"name": "ppl-base", "task": "perplexity", "model": folder, "data": text, "options": {"window": 32}},
        {"task": "lm", "adapter": run},
        {"name": "ppl-tuned", "task": "perplexity", "adapter": run, "data": text,
         "options": {"window": 32, "stride": 8}},
    ])
    out = tmp_path / "results"
    result = run_suite(suite, out)
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["ppl-base", "lm-2", "ppl-tuned"]
    assert all(r["status"] == "ok" for r in rows), rows
    content = open(text).read()
    lm = featherlm.load(folder)
    assert rows[0]["metrics"]["perplexity"] == pytest.approx(
        perplexity(lm.model, lm.tokenizer, content, window=32)["perplexity"], rel=1e-6)
    assert rows[1]["metrics"]["loss"] == pytest.approx(evaluate(run)["loss"], rel=1e-6)
    model, tokenizer, _ = load_run(run)
    assert rows[2]["metrics"]["perplexity"] == pytest.approx(
        perplexity(merge(model), tokenizer, content, window=32, stride=8)["perplexity"], rel=1e-5)
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["ppl-base", "lm-2", "ppl-tuned"] and saved["pending"] == []
    md = (out / "results.md").read_text()
    assert md == result["markdown"]
    assert md.count("\n| ") == 4  # header + three rows
    assert f"| ppl-base | perplexity | {folder} |" in md and "perplexity " in md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_failing_entry_becomes_an_error_row_and_the_rest_runs(tmp_path, lm_setup):
    folder, text, _ = lm_setup
    suite = write_suite(tmp_path / "suite.yaml", [
        {"name": "missing", "task": "perplexity", "model": folder, "data": str(tmp_path / "nope.txt")},
        {"name": "fine", "task": "perplexity", "model": folder, "data": text, "options": {"window": 16}},
    ])
    rows = run_suite(suite, tmp_path / "out")["rows"]
    assert rows[0]["status"] == "error" and "nope.txt: no such file" in rows[0]["error"]
    assert rows[1]["status"] == "ok"
    assert "error: " in (tmp_path / "out" / "results.md").read_text()


def test_code_entry_through_the_registry(tmp_path, lm_setup):
    """A tiny word-level model cannot write Python, so the prompts end in a comment: whatever it
    writes stays a comment (its tokens hold no newline), and the tests alone decide the result."""
    folder, _, _ = lm_setup
    problems = tmp_path / "problems.jsonl"
    base = {"prompt": "def answer():\n    return 42\n# note:", "entry_point": "answer"}
    problems.write_text(
        json.dumps({**base, "task_id": "t/0", "test": "def check(fn):\n    assert fn() == 42\n"}) + "\n"
        + json.dumps({**base, "task_id": "t/1", "test": "def check(fn):\n    assert fn() == 0\n"}) + "\n")
    suite = write_suite(tmp_path / "suite.yaml", [
        {"task": "code", "model": folder, "data": str(problems),
         "options": {"max_new_tokens": 6, "dtype": "float32", "timeout_s": 10, "memory_mb": 512}}])
    (row,) = run_suite(suite, None)["rows"]
    assert row["status"] == "ok", row
    assert row["metrics"]["pass@1"] == pytest.approx(0.5)
    assert [r["passed"] for r in row["metrics"]["results"]] == [1, 0]


def test_other_tasks_plug_into_the_registry(tmp_path):
    calls = []

    @register("echo-task", options=("x",))
    def echo(*, model, adapter, data, options):
        calls.append((model, adapter, data, options))
        return {"score": 0.5, "x": options.get("x", 0)}

    try:
        suite = write_suite(tmp_path / "s.yaml", [{"task": "echo-task", "model": "m", "data": "d",
                                                   "options": {"x": 3}}])
        result = run_suite(suite, None)
        assert calls == [("m", None, "d", {"x": 3})]
        assert "score 0.5, x 3" in result["markdown"]
        bad = write_suite(tmp_path / "b.yaml", [{"task": "echo-task", "model": "m", "options": {"y": 1}}])
        with pytest.raises(ConfigError, match=r"b\.yaml:1: unknown option 'y'"):
            read_suite(bad)
    finally:
        del EVALUATORS["echo-task"]


@pytest.mark.parametrize("text,message", [
    ("- task: perplexity\n  model: m\n  data: x\n- task: perplexity\n  modle: m\n", r"s\.yaml:4: unknown key 'modle'; "
                                                                                   r"did you mean 'model'\?"),
    ("- task: translate-klingon\n  model: m\n", r"s\.yaml:1: unknown task 'translate-klingon'"),
    ("- task: perplexity\n  data: x\n", r"s\.yaml:1: name a model or an adapter"),
    ("- task: classification\n  model: m\n", r"s\.yaml:1: task 'classification' evaluates a fine-tuning run"),
    ("- task: perplexity\n  model: m\n  options: {windw: 3}\n", r"s\.yaml:1: unknown option 'windw'; did you mean "
                                                             r"'window'\?"),
    ("- {name: a, task: perplexity, model: m}\n- {name: a, task: code, model: m}\n", r"s\.yaml:2: name 'a' is used "
                                                                                   r"twice \(line 1\)"),
    ("task: perplexity\n", r"s\.yaml: a suite is a non-empty YAML list"),
    ("- task: perplexity\n  model: [m\n", r"s\.yaml:3: invalid YAML"),
    ("- just a string\n", r"s\.yaml:1: an evaluation is a mapping"),
])
def test_bad_suite_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        run_suite(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_a_task_without_its_own_evaluator_runs_on_an_adapter(tmp_path, lm_setup):
    """Any fine-tuning task (here: one the registry does not list) falls back to the run evaluator,
    which checks the task against the run."""
    _, _, run = lm_setup
    suite = write_suite(tmp_path / "s.yaml", [{"task": "some-new-task", "adapter": run}, {"task": "lm", "adapter": run,
                                                                                        "options": {"batch_size": 2}}])
    assert "some-new-task" not in EVALUATORS
    first, second = run_suite(suite, None)["rows"]
    assert first["status"] == "error" and "task 'some-new-task' does not match the run" in first["error"]
    assert second["status"] == "ok" and second["metrics"]["task"] == "lm"


def test_cli_perplexity_code_and_suite(tmp_path, lm_setup, capsys):
    from featherlm.cli import main

    folder, text, run = lm_setup
    assert main(["evaluate", "--task", "perplexity", "--model", folder, "--data", text, "--window", "32",
                 "--stride", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lm = featherlm.load(folder)
    expected = perplexity(lm.model, lm.tokenizer, open(text).read(), window=32, stride=8)
    assert printed["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6) and printed["stride"] == 8
    assert main(["evaluate", "--task", "perplexity", "--adapter", run, "--data", text, "--window", "32"]) == 0
    assert "bits_per_byte" in capsys.readouterr().out

    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"task_id": "t/0", "prompt": "def answer():\n    return 42\n# note:",
                                    "entry_point": "answer", "test": "def check(fn):\n    assert fn() == 42\n"}) + "\n")
    assert main(["evaluate", "--task", "code", "--model", folder, "--data", str(problems), "--max-new-tokens", "4",
                 "--dtype", "float32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pass@1"] == 1.0 and printed["results"][0]["task_id"] == "t/0"

    suite = write_suite(tmp_path / "suite.yaml", [{"task": "perplexity", "model": folder, "data": text,
                                                   "options": {"window": 16}}])
    assert main(["evaluate", "--suite", suite, "--out", str(tmp_path / "res"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rows"][0]["status"] == "ok" and (tmp_path / "res" / "results.md").is_file()
    for args, message in ((["evaluate", "--suite", suite], "--suite needs --out"),
                          (["evaluate"], "name a fine-tuning run with --adapter"),
                          (["evaluate", "--task", "perplexity", "--model", folder], "needs --data"),
                          (["evaluate", "--task", "code", "--model", folder, "--data", str(problems), "--k", "1,x"],
                           "--k takes numbers")):
        assert main(args) == 2
        assert message in capsys.readouterr().err
