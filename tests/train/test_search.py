"""Hyper-parameter search on a tiny classifier: the grid is covered, random and Bayesian search are
seeded and reproducible, k folds partition the data, the best config loads back, bad spaces name
their line. Each trial is a few optimizer steps of a 2-layer, width-32 model."""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter

import pytest
import yaml

from featherlm.cli import main
from featherlm.errors import ConfigError
from featherlm.train import load_config
from featherlm.train.search import fold_assignment, read_records, read_space, search, write_folds


def base_config(tmp_path, tiny_checkpoint, sentiment_files, **train):
    train_file, dev_file = sentiment_files
    return {"model": {"name": tiny_checkpoint("bert")},
            "data": {"train": str(train_file), "eval": str(dev_file)},
            "peft": {"method": "lora", "r": 4},
            "train": {"lr": 1e-2, "batch_size": 32, "max_steps": 3, "log_every": 1, "seed": 0, **train},
            "out": {"dir": str(tmp_path / "unused"), "plot": False}}


def test_grid_covers_the_grid_and_writes_the_tables(tmp_path, tiny_checkpoint, sentiment_files):
    config = base_config(tmp_path, tiny_checkpoint, sentiment_files)
    space = {"train.lr": [1e-3, 3e-2], "peft.r": {"type": "choice", "values": [2, 4]}}
    out = tmp_path / "grid"
    result = search(config, space, sampler="grid", out=out, progress=False)
    trials = result["trials"]
    assert len(trials) == 4
    assert sorted((t["params"]["train.lr"], t["params"]["peft.r"]) for t in trials) == sorted(
        itertools.product([1e-3, 3e-2], [2, 4]))
    for t in trials:  # each trial's run used its values
        saved = load_config(out / f"trial-{t['trial']:03d}" / "config.yaml")
        assert (saved.train.lr, saved.peft.r) == (t["params"]["train.lr"], t["params"]["peft.r"])
        assert 0.0 <= t["value"] <= 1.0 and t["state"] == "complete"
    assert result["metric"] == "accuracy" and result["direction"] == "maximize"
    assert result["best"]["value"] == max(t["value"] for t in trials)
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["params"] for line in lines] == [t["params"] for t in trials]
    md = (out / "trials.md").read_text()
    assert md.count("\n| 0") == 4 and "| train.lr | peft.r | accuracy |" in md and "**" in md
    best = load_config(out / "best.yaml")  # a config finetune can train
    assert (best.train.lr, best.peft.r) == (result["best"]["params"]["train.lr"], result["best"]["params"]["peft.r"])
    assert best.out.dir == str(out / "best") and best.data.train == config["data"]["train"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temporary file
    # trials < grid size: the first combinations, in order
    again = search(config, space, sampler="grid", trials=2, out=tmp_path / "grid2", progress=False)
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in trials[:2]]


@pytest.mark.parametrize("sampler", ["random", "bayes"])
def test_random_and_bayes_are_seeded_and_reproducible(tmp_path, tiny_checkpoint, sentiment_files, sampler):
    config = base_config(tmp_path, tiny_checkpoint, sentiment_files)
    space_file = tmp_path / "space.yaml"
    space_file.write_text("train.lr: {type: loguniform, low: 1e-4, high: 1e-1}\n"
                          "train.batch_size: {type: int, low: 8, high: 32, step: 8}\n"
                          "peft.dropout: {type: uniform, low: 0.0, high: 0.3}\n")
    runs = [search(config, space_file, sampler=sampler, trials=3, seed=7, out=tmp_path / f"s{i}", progress=False)
            for i in range(2)]
    first, second = ([(t["params"], t["value"]) for t in r["trials"]] for r in runs)
    assert first == second
    for params, _ in first:
        assert 1e-4 <= params["train.lr"] <= 1e-1 and params["train.batch_size"] in (8, 16, 24, 32)
        assert 0.0 <= params["peft.dropout"] <= 0.3
    assert len({p["train.lr"] for p, _ in first}) == 3  # continuous values: drawn, not repeated
    other = search(config, space_file, sampler=sampler, trials=1, seed=8, out=tmp_path / "s8", progress=False)
    assert other["trials"][0]["params"] != first[0][0]  # the seed matters


def test_folds_partition_the_training_file(tmp_path, tiny_checkpoint, sentiment_files):
    config = load_config(base_config(tmp_path, tiny_checkpoint, sentiment_files))
    paths = write_folds(config, 3, seed=0, folder=tmp_path / "folds")
    original = read_records(sentiment_files[0], "tsv")
    held = [read_records(ev, "tsv") for _, ev in paths]
    assert all(h[0] == original[0] for h in held)  # the header is kept
    sizes = [len(h[1]) for h in held]
    assert sum(sizes) == len(original[1]) and max(sizes) - min(sizes) <= 1
    assert Counter(r for h in held for r in h[1]) == Counter(original[1])  # every example in exactly one fold
    for f, (tr, _) in enumerate(paths):
        train_rows = read_records(tr, "tsv")[1]
        assert Counter(train_rows) + Counter(held[f][1]) == Counter(original[1])
        assert train_rows == [r for r in original[1] if r in set(train_rows)]  # file order kept
    assert fold_assignment(20, 4, 0) == fold_assignment(20, 4, 0) != fold_assignment(20, 4, 1)

    raw = {"model": {"name": tiny_checkpoint("bert")}, "data": {"train": str(sentiment_files[0])},
           "peft": {"method": "lora", "r": 4}, "train": {"lr": 1e-2, "batch_size": 32, "max_steps": 2},
           "out": {"plot": False}}
    result = search(raw, {"train.lr": [1e-2]}, sampler="grid", folds=3, out=tmp_path / "cv", progress=False)
    (trial,) = result["trials"]
    assert len(trial["fold_values"]) == 3
    assert trial["value"] == pytest.approx(sum(trial["fold_values"]) / 3)
    for f in range(3):  # each fold run trained and evaluated on its own files
        saved = load_config(tmp_path / "cv" / "trial-000" / f"fold-{f}" / "config.yaml")
        assert saved.data.eval.endswith(f"fold-{f}/eval.tsv") and saved.data.train.endswith(f"fold-{f}/train.tsv")
    assert load_config(tmp_path / "cv" / "best.yaml").data.train == str(sentiment_files[0])


def test_folds_keep_csv_quoting_and_conll_sentences(tmp_path):
    path = tmp_path / "t.csv"
    rows = [["text", "label"], ['say "hi", then\nleave', "1"], ["plain", "0"], ["a,b", "1"], ["x", "0"]]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    head, records = read_records(path, "csv")
    assert head == rows[0] and records == rows[1:]
    conll = tmp_path / "t.txt"
    conll.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\n\n\nBlackburn B-LOC\n")
    assert read_records(conll, "conll")[1] == [["EU B-ORG", "rejects O"], ["Peter B-PER"], ["Blackburn B-LOC"]]


def test_bad_spaces_and_settings_name_the_problem(tmp_path, tiny_checkpoint, sentiment_files):
    config = base_config(tmp_path, tiny_checkpoint, sentiment_files)
    space = tmp_path / "space.yaml"
    for text, message in (
        ("train.lr: [0.1]\npeft.r: {type: normal, low: 1, high: 2}\n", r"space\.yaml:2: peft\.r needs a mapping"),
        ("train.lr: {type: loguniform, low: 0, high: 1}\n", r"space\.yaml:1: train\.lr: loguniform needs low > 0"),
        ("train.lr: {type: uniform, low: 1, hihg: 2}\n", r"space\.yaml:1: train\.lr: unknown key 'hihg'"),
        ("out.dir: [a, b]\n", r"space\.yaml:1: out\.dir is set by the search"),
        ("lr: [1, 2]\n", r"space\.yaml:1: 'lr' is not a dotted config key"),
        ("{}\n", r"space\.yaml: the search space is empty"),
    ):
        space.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_space(space)
    space.write_text("train.lr: [0.1]\ntrain.lrr: [0.1]\n")
    with pytest.raises(ConfigError, match=r"space\.yaml:2: train\.lrr: .*did you mean 'lr'"):  # not a config key
        search(config, space, sampler="grid", out=tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="needs steps"):
        search(config, {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, sampler="grid",
               out=tmp_path / "b", progress=False)
    no_eval = {**config, "data": {"train": config["data"]["train"]}}
    with pytest.raises(ConfigError, match="set data.eval"):
        search(no_eval, {"train.lr": [0.1]}, sampler="grid", out=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="unknown sampler"):
        search(config, {"train.lr": [0.1]}, sampler="annealing", trials=1, out=tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="5 folds need at least 5"):
        fold_assignment(4, 5, 0)
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing ran


def test_cli_search_and_refusing_to_overwrite(tmp_path, tiny_checkpoint, sentiment_files, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(base_config(tmp_path, tiny_checkpoint, sentiment_files)))
    space = tmp_path / "space.yaml"
    space.write_text("peft.r: {type: choice, values: [2, 4]}\n")
    args = ["search", "--config", str(config_file), "--space", str(space), "--sampler", "grid", "--out",
            str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["params"]["peft.r"] for t in result["trials"]] == [2, 4]
    assert main(args) == 2  # the folder holds a search already
    assert "already holds a search" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["search", "--config", str(config_file), "--space", str(space), "--sampler", "random",
                 "--out", str(tmp_path / "r")]) == 2
    assert "needs trials" in capsys.readouterr().err
