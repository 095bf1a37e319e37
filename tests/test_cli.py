"""`featherlm <verb>`: bad input gives one line on stderr and exit 2 (run as real subprocesses), and
generate / chat / info produce the documented output.

Each subprocess spends ~2.5 s importing torch, so all of them start together when this module's
first test runs (``runs``) and the in-process tests proceed meanwhile; each test then waits for its
own process. In-process tests call ``cli.main(argv)`` directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import featherlm
from featherlm import cli, hub

CONTEXT = 32
WORDS = "the a cat dog sat on mat and ran to park in sun Hi What is 2+2? four hello world big small".split()
GGUF = hub.resolve("smollm2-135m-instruct")
JSON_KEYS = {"text", "finish_reason", "prompt_tokens", "new_tokens", "prefill_tokens_per_s", "decode_tokens_per_s"}
# one torch thread per process (they run side by side on few cores); never reach for the network
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tiny_chat_folder) -> Path:
    return tiny_chat_folder(WORDS, context=CONTEXT)


# ----------------------------------------------------------------------------- subprocesses


class Run:
    """One `featherlm` process, started now; ``result()`` waits for (rc, stdout, stderr)."""

    def __init__(self, argv: list[str], cwd: Path, stdin: str | None = None) -> None:
        self.proc = subprocess.Popen(argv, cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)
        self.stdin = stdin  # piped when the test collects the result; the process waits for it
        self.done: tuple[int, str, str] | None = None

    def result(self) -> tuple[int, str, str]:
        if self.done is None:
            out, err = self.proc.communicate(self.stdin, timeout=180)
            self.done = (self.proc.returncode, out, err)
        return self.done


def featherlm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "featherlm.cli", *args]


def bad_inputs(root: Path, tiny: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (argv, what the one error line must contain)."""
    shutil.copytree(tiny, root / "no_config")
    (root / "no_config" / "config.json").unlink()
    shutil.copytree(tiny, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with GGUF.open("rb") as f:
        (root / "truncated.gguf").write_bytes(f.read(4 << 20))  # header and vocab intact, tensors cut
    shutil.copytree(tiny, root / "mamba")
    config = json.loads((root / "mamba" / "config.json").read_text())
    (root / "mamba" / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    long_prompt = " ".join(["the cat"] * 20)  # 40 tokens, context 32

    def gen(model: Path | str, prompt: str = "the cat") -> list[str]:
        return featherlm_cmd("generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", "4")

    return {
        "missing path": (gen(root / "missing"), [str(root / "missing"), "no such file or folder"]),
        "folder without config.json": (gen(root / "no_config"), [str(root / "no_config"), "config.json"]),
        "truncated safetensors": (gen(root / "truncated"), [str(weights), "truncated safetensors"]),
        "truncated gguf": (gen(root / "truncated.gguf"), [str(root / "truncated.gguf"), "truncated GGUF",
                                                          str(4 << 20)]),
        "unknown architecture": (gen(root / "mamba"), [str(root / "mamba" / "config.json"), "'mamba'"]),
        "prompt longer than context": (gen(tiny, long_prompt), ["prompt has 40 tokens", f"context is {CONTEXT}"]),
    }


BAD_CASES = ["missing path", "folder without config.json", "truncated safetensors",
             "truncated gguf", "unknown architecture", "prompt longer than context"]
CHAT_INPUT = "Hi\n/reset\nWhat is 2+2?\n/exit\nthe cat\n"  # the line after /exit must never be read


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory, tiny):
    """Start every subprocess of this module at once (see the module docstring)."""
    root = tmp_path_factory.mktemp("cli_runs")
    cases = bad_inputs(root, tiny)
    started = {name: Run(argv, root) for name, (argv, _) in cases.items()}
    started["real model"] = Run([str(Path(sys.executable).with_name("featherlm")), "generate", "--model",
                                 "smollm2-135m-instruct", "--prompt", "What is the capital of France?", "--chat",
                                 "--max-new-tokens", "12", "--json"], root)
    started["chat"] = Run(featherlm_cmd("chat", "--model", str(tiny), "--max-new-tokens", "4", "--json"), root,
                          stdin=CHAT_INPUT)
    yield {"expected": {name: needles for name, (_, needles) in cases.items()}, **started}
    for run in started.values():  # tests that failed early leave their process running
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


# ----------------------------------------------------------------------------- in process


def main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# The CLI loads models in bfloat16 by default; comparisons with the Python API load them the same way.
def generate_json(capsys, tiny: Path, *options: str) -> dict:
    rc, out, err = main(capsys, "generate", "--model", tiny, "--prompt", "the cat sat on", *options, "--json")
    assert rc == 0, err
    return json.loads(out.splitlines()[-1])


def test_generate_json(capsys, tiny):
    result = generate_json(capsys, tiny, "--max-new-tokens", "6")
    assert set(result) == JSON_KEYS
    assert result["prompt_tokens"] == 4
    assert 1 <= result["new_tokens"] <= 6
    assert result["finish_reason"] == ("length" if result["new_tokens"] == 6 else "stop")
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] >= 0
    expected = featherlm.load(tiny, dtype="bfloat16").generate("the cat sat on", max_new_tokens=6).text
    assert result["text"] and result["text"] == expected


def test_generate_streams_text_then_speeds_on_stderr(capsys, tiny):
    expected = generate_json(capsys, tiny, "--max-new-tokens", "6")
    rc, out, err = main(capsys, "generate", "--model", tiny, "--prompt", "the cat sat on", "--max-new-tokens", "6")
    assert rc == 0
    assert out == expected["text"] + "\n"
    assert err.startswith("[4 prompt tokens at ") and f"{expected['new_tokens']} new at" in err


def test_generate_seed_makes_sampling_repeatable(capsys, tiny):
    def sample(seed: int) -> str:
        options = ("--max-new-tokens", "12", "--temperature", "1.0", "--top-k", "20", "--seed", str(seed))
        return generate_json(capsys, tiny, *options)["text"]

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first


def test_generate_stop_cuts_the_text(capsys, tiny):
    full = generate_json(capsys, tiny, "--max-new-tokens", "12")["text"]
    words = full.split()
    assert len(words) >= 4, full
    stop = f" {words[2]}"
    result = generate_json(capsys, tiny, "--max-new-tokens", "12", "--stop", stop, "--stop", "never seen")
    assert result["text"] == full[: full.index(stop)]
    assert result["finish_reason"] == "stop"


def test_generate_beam_search(capsys, tiny):
    result = generate_json(capsys, tiny, "--max-new-tokens", "6", "--beams", "2", "--dtype", "float32")
    assert set(result) == JSON_KEYS and result["text"]
    assert 1 <= result["new_tokens"] <= 6
    lm = featherlm.load(tiny)  # float32, as asked for on the command line
    assert result["text"] == lm.generate("the cat sat on", max_new_tokens=6, num_beams=2).text
    assert result["text"] != lm.generate("the cat sat on", max_new_tokens=6).text  # not greedy: --beams was used
    rc, out, err = main(capsys, "generate", "--model", tiny, "--prompt", "the cat sat on", "--max-new-tokens", "6",
                        "--beams", "2", "--dtype", "float32")
    assert rc == 0 and out == result["text"] + "\n"


@pytest.mark.parametrize("options, message", [
    (("--beams", "2", "--temperature", "0.7"), "beam search is deterministic"),
    (("--top-p", "0",), "top_p must be in (0, 1]"),
    (("--dtype", "float16", "--max-new-tokens", "-1"), "max_new_tokens must be >= 0"),
])
def test_bad_generation_options_are_one_line_errors(capsys, tiny, options, message):
    rc, out, err = main(capsys, "generate", "--model", tiny, "--prompt", "the cat", *options)
    assert (rc, out) == (2, "")
    assert err == f"featherlm generate: error: {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1


def test_chat_rejects_beam_search(capsys, tiny):
    rc, out, err = main(capsys, "chat", "--model", tiny, "--beams", "2")
    assert (rc, out) == (2, "")
    assert err == "featherlm chat: error: chat streams its answers: use --beams 1\n"


def test_library_messages_on_several_lines_are_printed_on_one(capsys, monkeypatch):
    def broken(name, dtype="float32"):
        raise featherlm.CheckpointError(name, "first line\nsecond line")

    monkeypatch.setattr(featherlm, "load", broken)
    rc, out, err = main(capsys, "info", "some-model")
    assert (rc, out) == (2, "")
    assert err == "featherlm info: error: some-model: first line second line\n"


# ----------------------------------------------------------------------------- info

_LOADED: dict[str, featherlm.LoadedModel] = {}


@pytest.fixture
def load_once(monkeypatch):
    """``featherlm.load`` that keeps what it loaded: the real SmolLM2 file takes seconds to read."""
    real = featherlm.load

    def load(name, **kwargs):
        key = f"{name} {kwargs}"
        if key not in _LOADED:
            _LOADED[key] = real(name, **kwargs)
        return _LOADED[key]

    monkeypatch.setattr(featherlm, "load", load)


SMOLLM2 = {"name": "smollm2-135m-instruct", "kind": "gguf", "family": "llama", "n_layer": 30, "n_head": 9,
           "n_kv_head": 3, "d_model": 576, "d_ff": 1536, "head_dim": 64, "vocab_size": 49152,
           "context_length": 8192, "dtype": "float32", "stored_as": "Q4_1", "tokenizer_vocab_size": 49152,
           "files": [str(GGUF)]}


def test_info_json_smollm2(capsys, load_once):
    rc, out, _ = main(capsys, "info", "smollm2-135m-instruct", "--json")
    assert rc == 0
    info = json.loads(out.splitlines()[-1])
    assert {k: v for k, v in info.items() if k != "parameters"} == SMOLLM2
    assert info["parameters"] == pytest.approx(134.5e6, rel=1e-3)


def test_info_plain_smollm2(capsys, load_once):
    rc, out, _ = main(capsys, "info", "smollm2-135m-instruct")
    assert rc == 0
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()}
    for key in ("family", "n_layer", "n_head", "n_kv_head", "d_model", "vocab_size", "context_length", "files"):
        assert rows[key] == str(SMOLLM2[key][0] if key == "files" else SMOLLM2[key])
    assert rows["parameters"].endswith("(134.5M)") and rows["parameters"].startswith("134,5")


def test_info_json_minilm(capsys, load_once):
    rc, out, _ = main(capsys, "info", "minilm-l6", "--json")
    assert rc == 0
    info = json.loads(out.splitlines()[-1])
    assert (info["family"], info["n_layer"], info["d_model"], info["kind"]) == ("bert", 6, 384, "hf")
    assert info["context_length"] == 512 and info["vocab_size"] == 30522
    assert [Path(f).name for f in info["files"]] == ["config.json", "model.safetensors"]


def test_generate_with_an_encoder_is_a_one_line_error(capsys, load_once):
    rc, out, err = main(capsys, "generate", "--model", "minilm-l6", "--prompt", "Hello")
    assert (rc, out) == (2, "")
    assert err == "featherlm generate: error: minilm-l6 is an encoder (bert); it cannot generate text\n"


def test_version_and_unknown_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"featherlm {featherlm.__version__}\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- subprocess results
# (last in the file: the processes started by `runs` ran while the tests above did)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_on_stderr_and_exit_2(runs, case):
    rc, out, err = runs[case].result()
    assert "Traceback" not in err, err
    assert rc == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("featherlm generate: error: ")
    for needle in runs["expected"][case]:
        assert needle in lines[0]


def test_real_model_answers_paris(runs):
    rc, out, err = runs["real model"].result()
    assert rc == 0, err
    assert "Traceback" not in err
    result = json.loads(out.splitlines()[-1])
    assert "Paris" in result["text"]
    assert 1 <= result["new_tokens"] <= 12 and result["prompt_tokens"] > 10  # the chat template was applied


def test_chat_from_piped_stdin_resets_and_exits(runs):
    rc, out, err = runs["chat"].result()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "(history cleared)"  # not a tty: no banner, no prompts
    result = json.loads(lines[-1])
    assert result["turns"] == 1  # "Hi" was cleared by /reset; "the cat" comes after /exit
    messages = result["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "What is 2+2?"
    assert messages[1]["content"] == result["last"]["text"]
    # the reply continued this prompt: the reset history plus the chat template, nothing else
    assert result["last"]["prompt_tokens"] == len("<|im_start|> user What is 2+2? <|im_end|> <|im_start|> "
                                                  "assistant".split())
    assert 1 <= result["last"]["new_tokens"] <= 4


def test_stop_strings_from_the_shell_read_escapes():
    argv = ["generate", "--prompt", "x", "--stop", r"\n\n", "--stop", r"a\tb\\n", "--stop", "你好"]
    args = cli.build_parser().parse_args(argv)
    assert cli.generation_config(args).stop == ["\n\n", "a\tb\\n", "你好"]
