"""HumanEval-style code evaluation: problems, a sandbox that runs model-written programs, pass@k.

    problems = read_problems("../shared/data/code/humaneval/HumanEval.jsonl.gz")
    result = evaluate_code(model, tokenizer, problems[:20], n=1, k=(1,))    # greedy pass@1
    run_sandboxed("print(1/0)", timeout_s=5, memory_mb=256)["status"]       # "error"

Each completion is run as ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"`` in a
fresh ``python -I`` process (see ``run_sandboxed``; the prompt without its trailing newline by
default, see ``prompt_of``); it passes when that program runs to its end.
pass@k is the unbiased estimator of Chen et al. (2021) over n samples per problem.

The sandbox is layered, because no single layer is enough when the harness runs as root (as here):

- resource limits set in the child before the program starts: address space (memory), CPU seconds,
  file size, open files, processes (RLIMIT_NPROC), no core files;
- a pids cgroup capping the process count, where this process may create one (root on a cgroup v1
  pids hierarchy, or a delegated v2 one): RLIMIT_NPROC does not apply to root at all;
- a guard (an audit hook, which cannot be removed once installed) that ends the program on fork,
  exec, spawn, subprocess, kill, socket creation / connect / DNS, ctypes, raising resource limits,
  and on writes, deletes or renames outside the program's temporary directory;
- new network and pid namespaces (``unshare -n -p -f``) where available: only a loopback that is
  down, and when the sandbox ends the kernel kills and reaps every process it started (a machine
  whose PID 1 does not reap orphans, as here, would otherwise keep their zombies);
- a minimal environment, a temporary working directory deleted afterwards, and on overrun a
  SIGKILL to the whole process group (and to everything left in the cgroup).

It contains accidents of generated code (loops, fork bombs, memory hogs, stray network or file
access); it is not a security boundary against code written to escape it: run untrusted code at
scale inside a container or VM as well.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from featherlm.errors import ConfigError, DataError
from featherlm.generate import GenerationConfig, iter_tokens

DEFAULT_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint("]  # Codex paper's stop sequences
REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")
STATUSES = ("passed", "failed", "timeout", "error", "killed")


def default_problems_path() -> Path:
    """HumanEval in the project's shared data (``$FEATHERLM_DATA`` or ``../shared/data`` beside the repo)."""
    root = os.environ.get("FEATHERLM_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(root) / "code" / "humaneval" / "HumanEval.jsonl.gz"


# ----------------------------------------------------------------------------- problems


def read_problems(path: str | Path) -> list[dict[str, Any]]:
    """HumanEval problems from a ``.jsonl`` or ``.jsonl.gz`` file: one JSON object per line with
    ``task_id``, ``prompt``, ``test`` and ``entry_point`` (``canonical_solution`` is kept when
    present). A malformed line is a ``DataError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file" if not path.exists() else "not a file")
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    line = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            for line, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, line, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(path, line, f"broken JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(path, line, f"expected a JSON object, got {type(obj).__name__}")
                for key in REQUIRED_KEYS:
                    if not isinstance(obj.get(key), str) or (key != "test" and not obj[key]):
                        raise DataError(path, line, f"missing or non-string {key!r} (a problem needs "
                                                    f"{', '.join(REQUIRED_KEYS)})")
                if not obj["entry_point"].isidentifier():
                    raise DataError(path, line, f"entry_point {obj['entry_point']!r} is not a Python name")
                if obj["task_id"] in seen:
                    raise DataError(path, line, f"task_id {obj['task_id']!r} repeats line {seen[obj['task_id']]}")
                seen[obj["task_id"]] = line
                problems.append(obj)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(path, line + 1 if line else None, f"broken gzip data ({e})") from None
    if not problems:
        raise DataError(path, None, "no problems in the file")
    return problems


def prompt_of(problem: dict[str, Any], strip_prompt: bool = True) -> str:
    """The text a model continues: the prompt, without its trailing whitespace when ``strip_prompt``.

    HumanEval prompts end in a newline after the docstring. A BPE tokenizer then ends the prompt on
    a bare newline token, while in training text that newline is merged with the next line's
    indentation ("\\n    "): the model, seeing a token that is never followed by an indented body,
    starts a new top-level statement. SmolLM2 wrote an empty body for 107 of 164 problems that
    way (docs/benchmarks.md). The bigcode-evaluation-harness strips the prompt for this reason;
    ``strip_prompt=False`` keeps it as OpenAI's human-eval does.
    """
    return problem["prompt"].rstrip() if strip_prompt else problem["prompt"]


def program_for(problem: dict[str, Any], completion: str, strip_prompt: bool = True) -> str:
    """The program a completion is judged by: prompt, completion, the tests, and the call of check()."""
    return f"{prompt_of(problem, strip_prompt)}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


# ----------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomial
    coefficients (their ratio underflows / overflows for n in the hundreds)."""
    if not 0 <= c <= n:
        raise ValueError(f"c must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n={n}, got {k}")
    if n - c < k:
        return 1.0  # every k-subset holds a passing sample
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


# ----------------------------------------------------------------------------- sandbox

# Runs inside the sandboxed interpreter (python -I -B -c BOOTSTRAP CONFIG_JSON). Order matters: join
# the cgroup while still allowed to, set limits, install the guard, and only then run the program.
BOOTSTRAP = r'''
import json, os, resource, sys, traceback
cfg = json.loads(sys.argv[1])
if cfg["cgroup"]:
    try:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write("0")  # 0: the writing process (its pid number depends on the pid namespace)
    except OSError as e:  # fail closed: never run without the process cap that was asked for
        sys.stderr.write(f"sandbox: cannot join the pids cgroup: {e}\n")
        os._exit(70)
if os.getpid() == 1:
    # PID 1 of a new pid namespace: the kernel drops default-action signals (SIGXCPU...) sent to it, so
    # the program runs in a child; this process only waits. When it exits, the kernel kills and reaps
    # everything else in the namespace: no orphan lives on, and none is left a zombie.
    child = os.fork()
    if child:
        while True:
            pid, status = os.wait()
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                os._exit(128 - code if code < 0 else code)  # a signal as the shell reports it: 128 + signum

def limit(kind, value, extra=0):
    soft, hard = resource.getrlimit(kind)
    cap = (lambda v: v) if hard == resource.RLIM_INFINITY else (lambda v: min(v, hard))
    resource.setrlimit(kind, (cap(value), cap(value + extra)))

limit(resource.RLIMIT_AS, cfg["memory_bytes"])
limit(resource.RLIMIT_CPU, cfg["cpu_s"], 1)  # SIGXCPU at the soft limit, SIGKILL one second later
limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
limit(resource.RLIMIT_NOFILE, cfg["open_files"])
limit(resource.RLIMIT_NPROC, cfg["processes"])
limit(resource.RLIMIT_CORE, 0)
result = open(cfg["result"], "w")
violations = []

class SandboxViolation(BaseException):  # not an Exception: `except Exception` in the program cannot swallow it
    pass

if cfg["guard"]:
    import _posixsubprocess
    work = os.path.realpath(cfg["work"])
    allowed = (work + os.sep, "/dev/null")
    BLOCKED = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
               "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind",
               "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
               "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo", "resource.setrlimit",
               "resource.prlimit", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.setuid", "os.setgid"}
    BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"}
    PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "shutil.move", "os.chmod", "os.chown",
                   "os.truncate", "os.symlink", "os.link", "os.mkdir", "os.utime", "os.chflags", "os.lchflags",
                   "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return True  # a file descriptor: it was checked when it was opened
        try:
            full = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return True
        return full + os.sep == allowed[0] or full.startswith(allowed)

    def stop(what):
        violations.append(what)
        raise SandboxViolation(f"blocked by the sandbox: {what}")

    def hook(event, args):
        if event in BLOCKED:
            stop(event)
        elif event == "import" and args[0].split(".")[0] in BLOCKED_IMPORTS:
            stop(f"import {args[0]}")
        elif event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and not inside(path):
                stop(f"writing {path!r}")
        elif event in PATH_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    stop(f"{event} {arg!r}")

    def no_fork_exec(*args, **kwargs):
        stop("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = no_fork_exec  # multiprocessing calls it directly, without an audit event
    sys.addaudithook(hook)

status, reason = "passed", ""
try:
    with open(cfg["program"], encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except AssertionError:
    status, reason = "failed", "assertion failed"
    traceback.print_exc()
except MemoryError:
    status, reason = "killed", "memory limit"
    traceback.print_exc()
except SandboxViolation as e:
    status, reason = "killed", str(e)
    traceback.print_exc()
except SystemExit as e:  # a program passes by running to its end, so exit() cannot skip the tests
    status, reason = "error", f"the program called exit({e.code!r}) before its end"
except BaseException as e:
    status, reason = "error", f"{type(e).__name__}: {e}"[:300]
    traceback.print_exc()
if violations:  # sticky: a blocked action ends as killed even if the program caught the exception
    status, reason = "killed", f"blocked by the sandbox: {violations[0]}"
result.write(json.dumps({"status": status, "reason": reason}))
result.close()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0 if status == "passed" else 1)
'''


@functools.cache
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that works here: new network and pid namespaces, else a network
    namespace only, else nothing (needs root or unprivileged user namespaces)."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        return ()
    for flags in (("-n", "-p", "-f", "--kill-child"), ("-n",)):
        try:
            if subprocess.run([unshare, *flags, "--", "true"], capture_output=True, timeout=10).returncode == 0:
                return (unshare, *flags, "--")
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


def network_namespace_available() -> bool:
    return bool(namespace_prefix())


def pids_cgroup_parent() -> Path | None:
    """A cgroup folder of a pids hierarchy, this process's own, where a child cgroup can be made:
    cgroup v1 mounted with ``pids``, or v2 with ``pids`` in its subtree_control. None otherwise."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
        own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    except OSError:
        return None
    for _, point, fstype, options, *_ in mounts:
        if fstype == "cgroup" and "pids" in options.split(","):
            for _, controllers, path in own:
                if "pids" in controllers.split(","):
                    return _writable(Path(point) / path.lstrip("/"))
    for _, point, fstype, *_ in mounts:
        if fstype == "cgroup2":
            for hid, _, path in own:
                folder = Path(point) / path.lstrip("/")
                if hid == "0" and "pids" in _read(folder / "cgroup.subtree_control").split():
                    return _writable(folder)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _writable(folder: Path) -> Path | None:
    return folder if folder.is_dir() and os.access(folder, os.W_OK) else None


class PidsCgroup:
    """A child pids cgroup with ``pids.max`` set; ``close`` kills what is left in it and removes it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def create(cls, max_pids: int) -> PidsCgroup | None:
        parent = pids_cgroup_parent()
        if parent is None:
            return None
        folder = parent / f"featherlm-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            folder.mkdir()
        except OSError:
            return None
        try:
            (folder / "pids.max").write_text(str(max_pids))
        except OSError:
            cls(folder).close()
            return None
        return cls(folder)

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.folder / "cgroup.procs").split()]

    def close(self) -> None:
        for _ in range(200):  # each round kills all members; forks in between are capped by pids.max
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        for _ in range(100):  # killed tasks leave the cgroup once the kernel has reaped them
            try:
                self.folder.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: the ``children`` file is not always built in)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _stop(proc: subprocess.Popen, cgroup: PidsCgroup | None) -> None:
    """Kill whatever is left of a sandbox, children before parents, so that each process is reaped
    by its own parent: an orphan goes to PID 1, and this machine's PID 1 never reaps, so killing a
    parent first would leave its children as zombies. With a pid namespace, killing the
    namespace's PID 1 makes the kernel kill and reap everything inside it; unshare then reaps it."""
    if proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)  # the sandbox itself, and any member left after a normal end
    if cgroup is not None:
        cgroup.close()
    proc.wait()


def _tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - limit, 0))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_sandboxed(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, *, max_processes: int = 16,
                  max_file_mb: int = 16, max_open_files: int = 64, guard: bool = True, isolate_network: bool = True,
                  output_limit: int = 8192) -> dict[str, Any]:
    """Run a Python program in a sandbox (see the module docstring) and say how it ended.

    Returns ``{"passed", "status", "reason", "stderr", "stdout", "returncode", "time_s", "pid",
    "network_isolated", "pid_namespace", "pids_cgroup"}``. ``status``: "passed" (ran to its end), "failed" (an
    assertion failed), "error" (any other exception, or exit() before the end), "timeout" (wall
    clock ``timeout_s`` or CPU time exceeded) or "killed" (memory or file-size limit, a signal, or
    an action the guard blocks); ``reason`` says which in a few words. ``stderr``/``stdout``: the
    last ``output_limit`` bytes. ``pid``: the sandbox's process (group) id, gone on return.

    ``guard=False`` drops the audit hook (to test the other layers); it is refused when running
    as root without a pids cgroup, where nothing else would stop a fork bomb.
    """
    if timeout_s <= 0 or memory_mb < 32 or max_processes < 1:
        raise ConfigError("sandbox limits: timeout_s > 0, memory_mb >= 32 and max_processes >= 1 are needed")
    prefix = namespace_prefix() if isolate_network else ()
    root = os.geteuid() == 0
    cgroup = PidsCgroup.create(max_processes + ("-p" in prefix)) if root else None  # + the namespace's PID 1
    if not guard and root and cgroup is None:
        raise ConfigError("refusing to run unguarded as root without a pids cgroup: nothing would stop a fork bomb")
    work = Path(tempfile.mkdtemp(prefix="featherlm-sandbox-"))
    started = time.perf_counter()
    try:
        (work / "program.py").write_text(program, encoding="utf-8")
        cfg = {"cgroup": str(cgroup.folder) if cgroup else "", "memory_bytes": memory_mb * 2**20,
               "cpu_s": math.ceil(timeout_s) + 1, "file_bytes": max_file_mb * 2**20, "open_files": max_open_files,
               "processes": max_processes, "guard": guard, "work": str(work), "program": str(work / "program.py"),
               "result": str(work / ".result.json")}
        command = [sys.executable, "-I", "-B", "-c", BOOTSTRAP, json.dumps(cfg)]
        command = [*prefix, *command]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        timed_out = False
        with (work / ".stdout").open("wb") as out, (work / ".stderr").open("wb") as err:
            proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)  # own process group: killpg reaches all
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _stop(proc, cgroup)
                cgroup = None
        elapsed = time.perf_counter() - started
        rc = proc.returncode
        if "-p" in prefix and rc > 128:
            rc = 128 - rc  # the namespace's PID 1 passed a signal on as 128 + signum
        try:
            reported = json.loads((work / ".result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            reported = None
        if timed_out:
            status, reason = "timeout", f"wall-clock limit of {timeout_s:g} s"
        elif rc < 0:
            sig = -rc
            if sig in (signal.SIGXCPU, signal.SIGKILL) and elapsed >= cfg["cpu_s"] - 1:
                status, reason = "timeout", f"CPU time limit of {cfg['cpu_s']} s"
            elif sig == signal.SIGXFSZ:
                status, reason = "killed", f"file size limit of {max_file_mb} MB"
            else:
                status, reason = "killed", f"killed by {signal.Signals(sig).name}"
        elif reported is not None and reported.get("status") in STATUSES:
            status, reason = reported["status"], reported.get("reason", "")
        elif rc == 0:
            status, reason = "error", "the program ended without finishing (os._exit?)"
        else:
            status, reason = "error", f"exit code {rc}"
        return {"passed": status == "passed", "status": status, "reason": reason,
                "stderr": _tail(work / ".stderr", output_limit), "stdout": _tail(work / ".stdout", output_limit),
                "returncode": rc, "time_s": round(elapsed, 3), "pid": proc.pid, "network_isolated": bool(prefix),
                "pid_namespace": "-p" in prefix, "pids_cgroup": bool(cfg["cgroup"])}
    finally:
        if cgroup is not None:
            cgroup.close()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- generation and scoring


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def complete(model, tokenizer, prompts: list[str], cfg: GenerationConfig) -> list[str]:
    """Continuations of a batch of prompts, each ending at its first stop string or end token.

    Unlike ``generate_batch`` (which cuts stop strings after generating every row to the limit),
    decoding ends as soon as every row has stopped: HumanEval completions are mostly one short
    function, far below ``max_new_tokens``."""
    encoded = [tokenizer.encode(p) for p in prompts]
    eos = tokenizer.eos_ids
    decoders = [tokenizer.stream() for _ in prompts]
    texts = [""] * len(prompts)
    done = [False] * len(prompts)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for token in iter_tokens(model, encoded, cfg, eos, pad):  # (B,) per step
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
                continue
            texts[i], done[i] = _cut(texts[i] + decoders[i].feed(t), cfg.stop)
        if all(done):
            break
    for i in range(len(prompts)):
        if not done[i]:
            texts[i] = _cut(texts[i] + decoders[i].flush(), cfg.stop)[0]
    return texts


def evaluate_code(model, tokenizer, problems: Sequence[dict[str, Any]], *, n: int = 1, k: Sequence[int] = (1,),
                  temperature: float = 0.0, top_p: float = 0.95, max_new_tokens: int = 384,
                  stop: Sequence[str] = tuple(DEFAULT_STOP), batch_size: int = 8, workers: int | None = None,
                  timeout_s: float = 10.0, memory_mb: int = 1024, seed: int = 0, strip_prompt: bool = True,
                  progress: bool = False) -> dict[str, Any]:
    """Generate ``n`` completions per problem and run each against the problem's tests.

    The raw prompt is completed (HumanEval prompts are code, also for chat models: no chat
    template), without its trailing newline unless ``strip_prompt`` is off (see ``prompt_of``).
    Sampling uses ``temperature`` and ``top_p`` (the Codex paper's 0.95); greedy when
    ``temperature`` is 0, which makes ``n`` > 1 pointless and is refused. Programs run in the
    sandbox on ``workers`` threads while the next batch is generated. Returns ``{"pass@1", ...,
    "problems", "n", "passed", "statuses", "results": [{"task_id", "passed", "samples":
    [{"completion", "status", "reason"}]}], "time_s"}``.
    """
    k = sorted(set(k))
    if n < 1 or not k or not all(1 <= x <= n for x in k):
        raise ConfigError(f"pass@k needs 1 <= k <= n; got n={n}, k={list(k)}")
    if n > 1 and temperature == 0:
        raise ConfigError(f"n={n} greedy samples would all be the same: set a temperature (e.g. 0.8) for n > 1")
    if not problems:
        raise ConfigError("no problems to evaluate")
    from tqdm.auto import tqdm

    started = time.perf_counter()
    jobs = [(p, s) for p in range(len(problems)) for s in range(n)]
    prompts = [prompt_of(p, strip_prompt) for p in problems]
    lengths = {p: len(tokenizer.encode(prompts[p])) for p in range(len(problems))}
    jobs.sort(key=lambda j: lengths[j[0]])  # similar lengths batch with little padding
    samples: dict[tuple[int, int], dict[str, Any]] = {}
    futures = {}
    bar = tqdm(total=len(jobs), disable=not progress, desc="code", unit="sample", dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=workers or max(1, min(4, os.cpu_count() or 1))) as pool:
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b:b + batch_size]
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p if temperature > 0 else 1.0, stop=list(stop), seed=seed + b)
            texts = complete(model, tokenizer, [prompts[p] for p, _ in batch], cfg)
            for job, text in zip(batch, texts, strict=True):
                samples[job] = {"completion": text}
                program = program_for(problems[job[0]], text, strip_prompt)
                futures[job] = pool.submit(run_sandboxed, program, timeout_s, memory_mb)
            bar.update(len(batch))
        for job, future in futures.items():
            outcome = future.result()
            samples[job].update(status=outcome["status"], reason=outcome["reason"])
    bar.close()
    results, statuses = [], dict.fromkeys(STATUSES, 0)
    for p, problem in enumerate(problems):
        own = [samples[(p, s)] for s in range(n)]
        for sample in own:
            statuses[sample["status"]] += 1
        results.append({"task_id": problem["task_id"], "passed": sum(s["status"] == "passed" for s in own),
                        "samples": own})
    scores = {f"pass@{x}": sum(pass_at_k(n, r["passed"], x) for r in results) / len(results) for x in k}
    return {**scores, "problems": len(problems), "n": n, "passed": sum(r["passed"] for r in results),
            "statuses": statuses, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "strip_prompt": strip_prompt,
            "time_s": round(time.perf_counter() - started, 3), "results": results}


__all__ = ["DEFAULT_STOP", "read_problems", "prompt_of", "program_for", "pass_at_k", "run_sandboxed", "complete",
           "evaluate_code", "network_namespace_available", "default_problems_path"]
