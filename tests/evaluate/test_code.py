"""HumanEval harness: reading problems, pass@k, the sandbox's defences, and the evaluation loop.

The sandbox tests use small limits (1-2 s, 256 MB, 8 processes) so that the fork bomb, the loop and
the memory hog cannot hurt the machine; each asserts that nothing of the sandbox is left after it.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import socket
import tempfile
import time
from fractions import Fraction

import pytest

import featherlm
from featherlm.errors import ConfigError, DataError
from featherlm.evaluate import code as code_module
from featherlm.evaluate.code import (
    complete,
    evaluate_code,
    pass_at_k,
    program_for,
    read_problems,
    run_sandboxed,
)
from featherlm.generate import GenerationConfig, generate


@pytest.fixture(scope="module")
def humaneval(shared_data):
    return read_problems(shared_data / "code" / "humaneval" / "HumanEval.jsonl.gz")


def group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def sandbox_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("featherlm-sandbox-")}


# ----------------------------------------------------------------------------- problems


def test_reads_humaneval(humaneval):
    assert len(humaneval) == 164
    assert humaneval[0]["task_id"] == "HumanEval/0"
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= set(p) for p in humaneval)


def test_plain_jsonl_and_file_line_errors(tmp_path, humaneval):
    good = json.dumps({k: humaneval[0][k] for k in ("task_id", "prompt", "test", "entry_point")})
    path = tmp_path / "p.jsonl"
    path.write_text(good + "\n\n")
    assert read_problems(path)[0]["entry_point"] == humaneval[0]["entry_point"]
    cases = {
        good + "\n{broken\n": (2, "broken JSON"),
        good + "\n[1, 2]\n": (2, "expected a JSON object"),
        json.dumps({"task_id": "a", "prompt": "x", "test": "y"}) + "\n": (1, "'entry_point'"),
        json.dumps({"task_id": "a", "prompt": "x", "test": "y", "entry_point": "a b"}) + "\n": (1, "not a Python"),
        good + "\n" + good + "\n": (2, "repeats line 1"),
    }
    for text, (line, reason) in cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=reason) as e:
            read_problems(path)
        assert (e.value.path, e.value.line) == (str(path), line)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress((good + "\n{oops\n").encode()))
    with pytest.raises(DataError, match=r"p\.jsonl\.gz:2: broken JSON"):
        read_problems(gz)
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="broken gzip"):
        read_problems(gz)
    path.write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        read_problems(path)
    with pytest.raises(DataError, match="no such file"):
        read_problems(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- pass@k


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction that passed
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 2, 3) == 1.0  # any 3 of 4 include a pass
    for bad in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_equals_the_average_over_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(i < c for i in s) for s in subsets) / len(subsets)  # samples 0..c-1 pass
                assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    for n, c, k in ((200, 10, 100), (500, 3, 250), (1000, 999, 1)):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)


# ----------------------------------------------------------------------------- sandbox


def test_a_correct_solution_passes_and_a_wrong_one_fails(humaneval):
    before = sandbox_dirs()
    for problem in humaneval[:3]:
        result = run_sandboxed(program_for(problem, problem["canonical_solution"], strip_prompt=False),
                               timeout_s=10, memory_mb=512)
        assert result["status"] == "passed" and result["passed"], result
    stripped = program_for(humaneval[2], "\n" + humaneval[2]["canonical_solution"])  # the prompt's end stripped
    assert run_sandboxed(stripped, timeout_s=10, memory_mb=512)["passed"]
    wrong = run_sandboxed(program_for(humaneval[2], "\n    return 0.0\n"), timeout_s=10, memory_mb=512)
    assert wrong["status"] == "failed" and not wrong["passed"]
    assert "AssertionError" in wrong["stderr"]
    broken = run_sandboxed(program_for(humaneval[2], "\n    return undefined_name\n"), timeout_s=10, memory_mb=512)
    assert broken["status"] == "error" and "NameError" in broken["reason"]
    assert sandbox_dirs() == before  # every temporary folder was removed


def test_infinite_loop_is_killed_on_time():
    start = time.perf_counter()
    result = run_sandboxed("while True:\n    pass\n", timeout_s=1, memory_mb=256)
    assert result["status"] == "timeout" and not result["passed"]
    assert time.perf_counter() - start < 6
    assert group_gone(result["pid"])
    asleep = run_sandboxed("import time\ntime.sleep(60)\n", timeout_s=1, memory_mb=256)  # no CPU: the wall clock
    assert asleep["status"] == "timeout" and group_gone(asleep["pid"])


FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


def test_fork_bomb_is_stopped_by_the_guard():
    result = run_sandboxed(FORK_BOMB, timeout_s=2, memory_mb=256, max_processes=8)
    assert result["status"] == "killed" and "os.fork" in result["reason"]
    assert group_gone(result["pid"])
    for program, what in (("import subprocess\nsubprocess.run(['true'])\n", "subprocess.Popen"),
                          ("import multiprocessing as m\nm.Process(target=print).start()\n", "os.fork"),
                          ("import os\nos.system('true')\n", "os.system"),
                          ("import ctypes\n", "import ctypes")):
        result = run_sandboxed(program, timeout_s=5, memory_mb=256)
        assert result["status"] == "killed" and what in result["reason"], (program, result)


def test_fork_bomb_without_the_guard_is_contained_by_the_process_cap():
    """The layers under the guard: a pids cgroup (root) or RLIMIT_NPROC (other users) caps the bomb
    at 8 processes; the overrun kill leaves none behind. Running as root with no cgroup to create,
    the sandbox refuses to run unguarded instead."""
    if os.geteuid() == 0 and code_module.pids_cgroup_parent() is None:
        with pytest.raises(ConfigError, match="refusing to run unguarded"):
            run_sandboxed(FORK_BOMB, timeout_s=2, memory_mb=256, max_processes=8, guard=False)
        return
    start = time.perf_counter()
    result = run_sandboxed(FORK_BOMB, timeout_s=2, memory_mb=256, max_processes=8, guard=False)
    assert result["status"] == "timeout"
    assert time.perf_counter() - start < 10
    assert group_gone(result["pid"])
    assert result["pids_cgroup"] == (os.geteuid() == 0)
    # the cap itself: children that sleep stay alive, so forks succeed only up to the cap
    counter = ("import os, time\nn = 0\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n"
               "            time.sleep(60)\n            os._exit(0)\n        n += 1\n    except OSError:\n"
               "        break\nprint(n)\n")
    result = run_sandboxed(counter, timeout_s=5, memory_mb=256, max_processes=8, guard=False)
    assert result["status"] == "passed", result
    assert 0 < int(result["stdout"]) < 8
    assert group_gone(result["pid"])  # the sleeping children went with the sandbox


NETWORK = """import socket
for host, port in (("127.0.0.1", {port}), ("1.1.1.1", 80)):
    try:
        socket.create_connection((host, port), timeout=2).close()
        print(host, "connected")
    except OSError as e:
        print(host, "failed", e.errno)
"""


def test_network_calls_fail():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        program = NETWORK.format(port=server.getsockname()[1])
        guarded = run_sandboxed(program, timeout_s=5, memory_mb=256)
        assert guarded["status"] == "killed" and "socket" in guarded["reason"]
        raw = run_sandboxed("import _socket\ns = _socket.socket()\n", timeout_s=5, memory_mb=256)
        assert raw["status"] == "killed" and "socket.__new__" in raw["reason"]
        # under the guard: the network namespace alone has no route anywhere, not even to loopback
        assert code_module.network_namespace_available()
        bare = run_sandboxed(program, timeout_s=10, memory_mb=256, guard=False)
        assert bare["status"] == "passed" and bare["network_isolated"]
        lines = bare["stdout"].splitlines()
        assert [line.split()[:2] for line in lines] == [["127.0.0.1", "failed"], ["1.1.1.1", "failed"]]
    finally:
        server.close()


def test_memory_hog_is_stopped():
    result = run_sandboxed("x = bytearray(2 * 1024 ** 3)\n", timeout_s=5, memory_mb=256)
    assert result["status"] == "killed" and result["reason"] == "memory limit"
    grow = run_sandboxed("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)\n", timeout_s=10, memory_mb=256)
    assert grow["status"] == "killed" and grow["reason"] == "memory limit"


def test_files_outside_the_sandbox_stay_untouched(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("mine")
    for program in (f"open({str(victim)!r}, 'w').write('gone')\n", f"import os\nos.remove({str(victim)!r})\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                    f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')\n"):
        result = run_sandboxed(program, timeout_s=5, memory_mb=256)
        assert result["status"] == "killed" and "blocked" in result["reason"], (program, result)
    assert victim.read_text() == "mine"
    own = run_sandboxed("import tempfile\nopen('a.txt', 'w').write('x')\n"
                        "with tempfile.TemporaryFile() as f:\n    f.write(b'1')\n", timeout_s=5, memory_mb=256)
    assert own["passed"], own  # its own folder is writable


def test_exiting_early_is_not_a_pass():
    for program in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\n"):
        result = run_sandboxed(program, timeout_s=5, memory_mb=256)
        assert result["status"] == "error" and not result["passed"]


# ----------------------------------------------------------------------------- generation and the loop

CODE_WORDS = ["def", "f", "(", ")", ":", "return", "x", "+", "1", "print", "if", "else", "for", "in", "#", "class",
              "\n", "    ", "y", "=", "2"]


def test_batched_completion_equals_generate_one_by_one(tiny_chat_folder):
    lm = featherlm.load(tiny_chat_folder(CODE_WORDS, context=64, seed=7))
    prompts = ["def f ( x ) :", "x = 1", "for y in x : return", "class"]
    stops = [" return", " (", " =", " :"]  # short enough that random weights hit them
    cfg = GenerationConfig(max_new_tokens=12, stop=stops)
    batched = complete(lm.model, lm.tokenizer, prompts, cfg)
    alone = [generate(lm.model, lm.tokenizer, p, GenerationConfig(max_new_tokens=12, stop=stops)) for p in prompts]
    assert batched == [r.text for r in alone]
    assert {r.finish_reason for r in alone} == {"stop", "length"}  # both endings are exercised


def test_evaluate_code_scores_what_the_sandbox_says(humaneval, monkeypatch):
    """The loop with completions fixed: canonical solutions pass, a wrong one fails, statuses add up."""
    problems = humaneval[:4]
    # the model continues the prompt without its trailing newline (prompt_of), so a body starts with one
    canned = {p["prompt"].rstrip(): "\n" + p["canonical_solution"] for p in problems}
    canned[problems[1]["prompt"].rstrip()] = "\n    return []\n"  # wrong

    def fake_complete(model, tokenizer, prompts, cfg):
        assert cfg.stop and cfg.temperature == 0
        return [canned[p] for p in prompts]

    class Tok:
        def encode(self, text):
            return list(range(len(text) // 10))

    monkeypatch.setattr(code_module, "complete", fake_complete)
    result = evaluate_code(None, Tok(), problems, n=1, k=(1,), workers=2, batch_size=3)
    assert result["pass@1"] == pytest.approx(3 / 4)
    assert [r["passed"] for r in result["results"]] == [1, 0, 1, 1]
    assert result["statuses"]["passed"] == 3 and sum(result["statuses"].values()) == 4
    assert result["results"][1]["samples"][0]["status"] == "failed"
    assert [r["task_id"] for r in result["results"]] == [p["task_id"] for p in problems]


def test_evaluate_code_checks_its_settings(humaneval):
    with pytest.raises(ConfigError, match="1 <= k <= n"):
        evaluate_code(None, None, humaneval[:1], n=2, k=(5,), temperature=0.8)
    with pytest.raises(ConfigError, match="greedy"):
        evaluate_code(None, None, humaneval[:1], n=5, k=(1,))


@pytest.mark.slow
def test_smollm2_runs_end_to_end_on_two_problems(humaneval):
    lm = featherlm.load("smollm2-135m-instruct", dtype="bfloat16")
    result = evaluate_code(lm.model, lm.tokenizer, humaneval[:2], max_new_tokens=128)
    assert result["problems"] == 2 and 0.0 <= result["pass@1"] <= 1.0
    for r in result["results"]:
        sample = r["samples"][0]
        assert sample["status"] in code_module.STATUSES and sample["completion"].strip()
