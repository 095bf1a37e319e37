"""`featherlm finetune / evaluate / merge` and `generate --adapter`, in process through cli.main."""

from __future__ import annotations

import json

import pytest
import torch

import featherlm
from featherlm.cli import main
from featherlm.evaluate import classify
from featherlm.train import load_run


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_finetune_flags_and_dotted_overrides_then_evaluate(tmp_path, capsys, tiny_checkpoint, sentiment_files):
    train, dev = sentiment_files
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "finetune", "--model", tiny_checkpoint("bert"), "--task", "classification",
                              "--data", train, "--eval-data", dev, "--method", "lora", "--out", out,
                              "--train.lr", "5e-3", "--train.epochs", "2", "--peft.r", "4", "--json")
    assert rc == 0, err
    result = last_json(stdout)
    assert result["run_dir"] == str(out) and result["method"] == "lora" and result["finished"]
    assert 0 < result["trainable_params"] < result["total_params"]
    _, _, config = load_run(out)
    assert (config.train.lr, config.train.epochs, config.peft.r) == (5e-3, 2, 4)  # the overrides were applied

    rc, stdout, err = run_cli(capsys, "evaluate", "--adapter", out, "--model", tiny_checkpoint("bert"),
                              "--task", "classification", "--data", dev, "--json")
    assert rc == 0, err
    scores = last_json(stdout)
    assert {"accuracy", "precision", "recall", "f1", "confusion", "n"} <= set(scores)
    assert scores["n"] == 32 and sum(map(sum, scores["confusion"])) == 32
    assert scores["accuracy"] == pytest.approx(result["eval"]["accuracy"])  # the best checkpoint, reloaded

    model, tokenizer, _ = load_run(out)  # classify() agrees with the evaluation, text by text
    rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    predictions = classify(model, tokenizer, [text for text, _ in rows])
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 and p["score"] == max(p["scores"].values())
               for p in predictions)
    hits = sum(p["label"] == label for p, (_, label) in zip(predictions, rows, strict=True))
    assert hits / len(rows) == pytest.approx(scores["accuracy"])

    for verb, flag in (("evaluate", "--model"), ("evaluate", "--task"), ("merge", "--model")):
        extra = ["--out", tmp_path / "m"] if verb == "merge" else []
        rc, stdout, err = run_cli(capsys, verb, "--adapter", out, flag, "other", *extra)
        assert (rc, stdout) == (2, "") and f"{flag} 'other' does not match the run in {out}" in err
    assert not (tmp_path / "m").exists()

    rc, stdout, _ = run_cli(capsys, "evaluate", "--adapter", out)  # plain text, the run's own eval data
    assert rc == 0 and "accuracy" in stdout and "confusion (rows: true, columns: predicted)" in stdout


def test_finetune_user_mistakes_are_one_line_errors(tmp_path, capsys, tiny_checkpoint, sentiment_files):
    train, dev = sentiment_files
    rc, out, err = run_cli(capsys, "finetune", "--model", tiny_checkpoint("bert"), "--data", train,
                           "--out", tmp_path / "r", "--train.lrr", "1e-3")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "'lr'" in err  # the nearest valid key
    rc, out, err = run_cli(capsys, "finetune", "--model", tiny_checkpoint("bert"), "--data", tmp_path / "none.tsv",
                           "--out", tmp_path / "r2")
    assert rc == 2 and err.count("\n") == 1 and "none.tsv" in err
    rc, _, err = run_cli(capsys, "evaluate", "--adapter", tmp_path, "--data", dev)
    assert rc == 2 and "no config.yaml" in err
    with pytest.raises(SystemExit) as stop:  # argparse rejects dotted flags outside finetune
        main(["generate", "--prompt", "hi", "--train.lr", "1"])
    assert stop.value.code == 2 and "unrecognized arguments: --train.lr 1" in capsys.readouterr().err


def test_sft_run_generates_with_adapter_and_merges(tmp_path, capsys, tiny_checkpoint, chat_file):
    out = tmp_path / "sft"
    base = tiny_checkpoint("llama")
    rc, _, err = run_cli(capsys, "finetune", "--model", base, "--task", "sft", "--data", chat_file,
                         "--method", "lora", "--out", out, "--train.lr", "1e-2", "--train.epochs", "2", "--json")
    assert rc == 0, err
    prompt = "say good film"
    rc, stdout, err = run_cli(capsys, "generate", "--adapter", out, "--prompt", prompt, "--max-new-tokens", "4",
                              "--dtype", "float32", "--json")
    assert rc == 0, err
    with_adapter = last_json(stdout)["text"]
    model, tokenizer, _ = load_run(out)
    expected = featherlm.LoadedModel(model, tokenizer, "run").generate(prompt, max_new_tokens=4).text
    assert with_adapter == expected  # merged for speed, same greedy text as the unmerged run model

    merged_dir = tmp_path / "merged"
    rc, stdout, err = run_cli(capsys, "merge", "--adapter", out, "--out", merged_dir, "--json")
    assert rc == 0, err
    assert last_json(stdout)["format"] == "featherlm"
    merged = featherlm.load(merged_dir)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        assert torch.allclose(merged.model(ids).logits, model(ids).logits, atol=1e-5)
    rc, stdout, err = run_cli(capsys, "merge", "--adapter", out, "--out", tmp_path / "hf", "--hf", "--json")
    assert rc == 0, err
    assert (tmp_path / "hf" / "config.json").is_file()


def test_merge_refuses_a_classification_run(tmp_path, capsys, tiny_checkpoint, sentiment_files):
    train, dev = sentiment_files
    out = tmp_path / "cls"
    assert run_cli(capsys, "finetune", "--model", tiny_checkpoint("bert"), "--data", train, "--out", out,
                   "--json")[0] == 0
    rc, out_text, err = run_cli(capsys, "merge", "--adapter", out, "--out", tmp_path / "m")
    assert rc == 2 and "classifier" in err and not (tmp_path / "m").exists()
