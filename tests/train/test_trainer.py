"""The training loop on tiny models: it learns, resumes exactly, refuses bad data and configs cleanly.

Runs are a few dozen steps of a 2-layer, width-32 model: each takes well under a second.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featherlm.errors import ConfigError, DataError
from featherlm.evaluate import evaluate
from featherlm.peft import METHODS
from featherlm.train import finetune, load_config, load_run, parse_overrides
from featherlm.train.run import read_metrics
from featherlm.train.trainer import TIMING_KEYS, enable_gradient_checkpointing, interruptible, lr_factor, make_optimizer

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path, checkpoint, train_file, eval_file=None, **sections):
    """A run's config as a dict; ``sections`` update single keys (``train={"lr": 1e-3}``)."""
    cfg = {
        "model": {"name": checkpoint},
        "data": {"train": str(train_file), "eval": str(eval_file) if eval_file else ""},
        "peft": {"method": "lora", "r": 4, "alpha": 8.0},
        "train": {"lr": 3e-2, "batch_size": 16, "epochs": 4, "log_every": 2, "seed": 0},
        "out": {"dir": str(tmp_path / "run"), "plot": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values}
    return cfg


def weights(folder):
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("method,lr,epochs", [("full", 1e-2, 6), ("lora", 3e-2, 8)])
def test_classification_learns_a_separable_task(tmp_path, tiny_checkpoint, sentiment_files, method, lr, epochs):
    cfg = config(tmp_path, tiny_checkpoint("bert"), *sentiment_files, peft={"method": method},
                 train={"lr": lr, "epochs": epochs}, out={"plot": method == "lora"})
    result = finetune(cfg, progress=False)
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert sum(train_losses[-3:]) < 0.7 * sum(train_losses[:3])  # log lines average 2 steps each
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert result["best_value"] == max(r["accuracy"] for r in evals) >= 0.8
    assert result["finished"] and result["step"] == result["total_steps"] == epochs * 6
    assert len(evals) == epochs  # eval_every 0: at each epoch's end
    assert json.loads((run / "best" / "eval.json").read_text())["step"] == result["best_step"]
    assert load_config(run / "config.yaml").model.labels == ["0", "1"]  # the resolved config, labels included
    assert (run / "curves.png").exists() == (method == "lora")
    if method == "lora":
        assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert result["trainable_params"] < result["total_params"] / 5


def test_progress_reports_trainable_parameters(tmp_path, tiny_checkpoint, sentiment_files, capsys):
    cfg = config(tmp_path, tiny_checkpoint("bert"), sentiment_files[0], train={"max_steps": 2})
    result = finetune(cfg, progress=True)
    err = capsys.readouterr().err
    assert f"trainable parameters: {result['trainable_params']:,} of {result['total_params']:,}" in err


def test_sft_learns_response_tokens(tmp_path, tiny_checkpoint, chat_file):
    cfg = config(tmp_path, tiny_checkpoint("llama"), chat_file, chat_file, model={"task": "sft"},
                 peft={"method": "full"}, train={"lr": 1e-2, "epochs": 3, "batch_size": 8})
    result = finetune(cfg, progress=False)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "eval"]
    assert result["metric"] == "loss" and evals[-1]["loss"] < 0.5 * evals[0]["loss"]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]))
    # tokens scored: the response words plus the EOS the plain template lacks; nothing of the prompts
    positive = sum("yes" in line for line in chat_file.read_text().splitlines())
    assert evals[-1]["tokens"] == 3 * positive + 2 * (48 - positive)


def test_plain_lm_on_raw_text(tmp_path, tiny_checkpoint):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the movie was good and the film was great ."] * 40))
    cfg = config(tmp_path, tiny_checkpoint("llama"), text, text, model={"task": "lm"}, peft={"method": "full"},
                 train={"max_seq_len": 16, "epochs": 5, "batch_size": 8, "lr": 1e-2})
    result = finetune(cfg, progress=False)
    assert result["train_examples"] == 400 // 16  # 40 x 10 word tokens in 16-token blocks
    assert result["eval"]["loss"] < 0.5 * math.log(97)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family,task", [("bert", "classification"), ("llama", "sft")])
def test_every_peft_method_trains_saves_and_reloads(tmp_path, tiny_checkpoint, sentiment_files, chat_file, method,
                                                    family, task):
    """Method-agnostic: each method trains, and its saved best checkpoint reloads to the same scores."""
    files = sentiment_files if task == "classification" else (chat_file, chat_file)
    cfg = config(tmp_path, tiny_checkpoint(family), *files, model={"task": task},
                 peft={"method": method, "num_virtual_tokens": 4, "freeze": "top:1"},
                 train={"max_steps": 2, "lr": 1e-2})
    result = finetune(cfg, progress=False)
    assert 0 < result["trainable_params"] <= result["total_params"]
    best = json.loads((tmp_path / "run" / "best" / "eval.json").read_text())
    assert evaluate(tmp_path / "run")["loss"] == pytest.approx(best["loss"], rel=1e-6)


def test_first_ctrl_c_asks_for_a_stop_and_the_second_interrupts():
    with interruptible() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag["requested"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_the_sst2_example_recipe_loads(shared_data):
    cfg = load_config(REPO / "examples" / "sst2-lora.yaml")
    assert cfg.model.name == "minilm-l6" and cfg.peft.method == "lora" and "classifier" in cfg.peft.modules_to_save
    for path in (cfg.data.train, cfg.data.eval):  # relative to the project root, where the recipe is run
        assert (REPO / path).resolve() == (shared_data / "sentiment/sst2" / Path(path).name).resolve()


# ----------------------------------------------------------------------------- resume


RESUME = {"peft": {"method": "lora", "r": 4, "dropout": 0.1},  # dropout: the RNG state must carry over
          "train": {"batch_size": 8, "grad_accum": 2, "epochs": 2, "eval_every": 5, "log_every": 2},
          "model": {"dropout": 0.1}}


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, tiny_checkpoint, sentiment_files):
    whole = config(tmp_path / "a", tiny_checkpoint("bert"), *sentiment_files, **RESUME)
    finetune(whole, progress=False)
    split = config(tmp_path / "b", tiny_checkpoint("bert"), *sentiment_files, **RESUME)
    stopped = finetune(split, stop_after=7, progress=False)  # mid-epoch, between evaluations
    assert stopped["stopped"] == "stop_after" and stopped["step"] == 7 and not stopped["finished"]
    assert json.loads((tmp_path / "b/run/last/trainer_state.json").read_text())["step"] == 7
    assert finetune(split, resume=True, stop_after=7, progress=False)["step"] == 7  # already there: no step
    resumed = finetune(split, resume=True, progress=False)
    assert resumed["finished"] and resumed["step"] == 12
    a, b = tmp_path / "a/run", tmp_path / "b/run"
    for name in ("last", "best"):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert without_timing(read_metrics(a / "metrics.jsonl")) == without_timing(read_metrics(b / "metrics.jsonl"))


def test_resume_after_a_crash_drops_the_lines_past_the_checkpoint(tmp_path, tiny_checkpoint, sentiment_files):
    whole = config(tmp_path / "a", tiny_checkpoint("bert"), *sentiment_files, **RESUME)
    finetune(whole, progress=False)
    cfg = config(tmp_path / "b", tiny_checkpoint("bert"), *sentiment_files, **RESUME)
    run = tmp_path / "b/run"
    finetune(cfg, stop_after=3, progress=False)
    shutil.copytree(run / "last", tmp_path / "last-at-3")
    finetune(cfg, resume=True, stop_after=10, progress=False)  # logs and evaluates steps 4..10
    shutil.rmtree(run / "last")
    shutil.copytree(tmp_path / "last-at-3", run / "last")  # as if it died right after step 10's log lines
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 10
    finetune(cfg, resume=True, progress=False)
    wa, wb = weights(tmp_path / "a/run/last"), weights(run / "last")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert without_timing(read_metrics(tmp_path / "a/run/metrics.jsonl")) == without_timing(read_metrics(
        run / "metrics.jsonl"))


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, tiny_checkpoint, sentiment_files,
                                                                 monkeypatch):
    cfg = config(tmp_path, tiny_checkpoint("bert"), *sentiment_files, **RESUME)
    finetune(cfg, stop_after=3, progress=False)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in (run / "last").rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("featherlm.train.run.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        finetune(cfg, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in (run / "last").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.yaml", "last", "metrics.jsonl"]  # no temp dirs


# ----------------------------------------------------------------------------- accumulation, flags, stopping


def test_grad_accum_gives_the_update_of_one_big_batch(tmp_path, tiny_checkpoint, chat_file):
    """Token-weighted: micro-batches with different numbers of response tokens still add up right."""
    runs = []
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        cfg = config(tmp_path / name, tiny_checkpoint("llama"), chat_file, model={"task": "sft"},
                     peft={"method": "full"}, train={"batch_size": batch, "grad_accum": accum, "epochs": 1, "lr": 1e-2})
        finetune(cfg, progress=False)
        runs.append(weights(tmp_path / name / "run" / "last"))
    big, accum = runs
    assert big.keys() == accum.keys()
    assert all(torch.allclose(big[k], accum[k], atol=1e-5, rtol=1e-4) for k in big)


def test_gradient_checkpointing_recomputes_blocks_in_backward(tiny_model, monkeypatch):
    from featherlm.model.layers import MLP

    model = tiny_model("llama").train()
    calls = []
    forward = MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, x: calls.append(1) or forward(self, x))
    ids = torch.tensor([[1, 2, 3, 4]])
    model(ids).logits.sum().backward()
    assert len(calls) == 2  # one per block
    enable_gradient_checkpointing(model)
    calls.clear()
    model(ids).logits.sum().backward()
    assert len(calls) == 4  # each block once more in backward, instead of storing its activations


def test_gradient_checkpointing_changes_nothing_and_bf16_runs(tmp_path, tiny_checkpoint, sentiment_files):
    out = {}
    for name, flags in (("plain", {}), ("ckpt", {"gradient_checkpointing": True}), ("bf16", {"bf16": True})):
        cfg = config(tmp_path / name, tiny_checkpoint("bert"), *sentiment_files,
                     train={"max_steps": 3, **flags}, peft={"method": "full"})
        out[name] = (finetune(cfg, progress=False), weights(tmp_path / name / "run" / "last"))
    (_, plain), (_, ckpt) = out["plain"], out["ckpt"]
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
    result, bf16 = out["bf16"]
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["eval"]["loss"])
    assert any(not torch.equal(bf16[k], plain[k]) for k in plain)  # autocast did change the numerics


def test_early_stopping(tmp_path, tiny_checkpoint, sentiment_files):
    cfg = config(tmp_path, tiny_checkpoint("bert"), *sentiment_files,
                 train={"lr": 1e-9, "eval_every": 1, "early_stopping_patience": 2, "epochs": 2})
    result = finetune(cfg, progress=False)
    assert result["stopped"] == "early_stopping" and result["finished"]
    assert result["step"] == 3 and result["best_step"] == 1  # equal is no improvement
    assert json.loads((tmp_path / "run/last/trainer_state.json").read_text())["stopped_early"]
    again = finetune(cfg, resume=True, progress=False)  # a stopped run stays stopped
    assert again["step"] == 3 and again["stopped"] is None and again["finished"]


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "linear") for s in range(4)] == [0.5, 1.0, 1.0, 0.875]
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(0.125)  # never 0 inside the run
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_no_weight_decay_on_biases_and_norms(tmp_path, tiny_checkpoint, sentiment_files):
    from featherlm.train.run import build_for_run

    cfg = load_config(config(tmp_path, tiny_checkpoint("bert"), sentiment_files[0], peft={"method": "full"},
                             model={"labels": ["0", "1"]}))
    model, _ = build_for_run(cfg)
    names, optimizer = make_optimizer(model, cfg)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    no_decay_names = names[len(decay["params"]):]
    assert "classifier.bias" in no_decay_names and "backbone.embed_norm.weight" in no_decay_names
    assert all(p.dim() >= 2 for p in decay["params"]) and len(names) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- bad data, bad configs


def test_bad_eval_row_stops_before_anything_is_written(tmp_path, tiny_checkpoint, sentiment_files):
    train, dev = sentiment_files
    dev.write_text(dev.read_text() + "a strange row\t2\n")
    cfg = config(tmp_path, tiny_checkpoint("bert"), train, dev)
    with pytest.raises(DataError) as err:
        finetune(cfg, progress=False)
    assert err.value.path == str(dev) and err.value.line == 34 and "unknown label '2'" in err.value.reason
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="match no module"):
        finetune(config(tmp_path, tiny_checkpoint("bert"), train, peft={"target_modules": ["qkv"]}), progress=False)
    assert not (tmp_path / "run").exists()
    result = finetune(config(tmp_path, tiny_checkpoint("bert"), train, dev, data={"skip_bad_rows": True},
                             train={"max_steps": 1}), progress=False)
    assert result["skipped_rows"] == {"train": 0, "eval": 1} and result["eval_examples"] == 32


def test_run_dir_guards(tmp_path, tiny_checkpoint, sentiment_files):
    cfg = config(tmp_path, tiny_checkpoint("bert"), sentiment_files[0], train={"max_steps": 2})
    with pytest.raises(ConfigError, match="nothing to resume"):
        finetune(cfg, resume=True, progress=False)
    finetune(cfg, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        finetune(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"config differs in train\.lr"):
        finetune(cfg, overrides=["--train.lr", "0.5"], resume=True, progress=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    finetune(cfg, overrides=["--out.overwrite"], progress=False)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # overwrite clears only what a run writes


def test_config_is_strict_and_takes_dotted_overrides(tmp_path):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("model: {name: m}\ndata: {train: t.tsv}\ntrain:\n  lr: 5e-4\n  epohcs: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'epohcs'; did you mean 'epochs'\?"):
        load_config(yaml_path)
    yaml_path.write_text("model: {name: m}\ndata: {train: t.tsv}\ntrian: {lr: 1}\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(yaml_path)
    yaml_path.write_text("model: {name: m}\ndata: {train: t.tsv}\ntrain:\n  lr: 5e-4\n")
    cfg = load_config(yaml_path, ["--train.lr", "1e-3", "--peft.target_modules=[q_proj, v_proj]",
                                  "--data.skip_bad_rows", "--train.batch_size=8", "--data.text_column", "review"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.peft.target_modules == ["q_proj", "v_proj"] and cfg.data.skip_bad_rows is True
    assert cfg.train.batch_size == 8 and cfg.data.text_column == "review"
    assert cfg.peft.modules_to_save == ["classifier"]  # the new head always trains and is saved
    assert cfg.peft.base_model == "m"
    assert load_config(cfg) == cfg  # a config round-trips through its dict
    assert parse_overrides({"train.lr": 2.0, "peft.r": 4}) == {"train": {"lr": 2.0}, "peft": {"r": 4}}
    for bad, message in [
        (["--train.lrr", "1"], "did you mean 'lr'"),
        (["--train.batch_size", "many"], "expected int"),
        (["--train.schedule", "steep"], "is not one of"),
        (["train.lr", "1"], "expected --section.key"),
        (["--train.lr.x", "1"], "expected float"),
        (["--train.metric", "f1", "--model.task", "sft"], "not reported by task"),
        (["--train.early_stopping_patience", "2"], "needs evaluation data"),
        (["--model.name="], "model.name is required"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(yaml_path, bad)
    yaml_path.write_text("model: {name: m\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(yaml_path)


# ----------------------------------------------------------------------------- evaluate a run


def test_evaluate_reloads_the_best_checkpoint(tmp_path, tiny_checkpoint, sentiment_files):
    cfg = config(tmp_path, tiny_checkpoint("bert"), *sentiment_files, train={"epochs": 3})
    finetune(cfg, progress=False)
    best = json.loads((tmp_path / "run" / "best" / "eval.json").read_text())
    scores = evaluate(tmp_path / "run")
    assert scores["accuracy"] == best["accuracy"] and scores["confusion"] == best["confusion"]
    assert scores["loss"] == pytest.approx(best["loss"], rel=1e-5)
    assert scores["labels"] == ["0", "1"] and scores["n"] == 32
    model, tokenizer, loaded = load_run(tmp_path / "run", "last")
    assert not model.training and loaded.model.labels == ["0", "1"]
    assert set(evaluate(tmp_path / "run", sentiment_files[0], checkpoint="last")) >= {"accuracy", "f1", "n"}


def test_eval_ratio_holds_out_a_seeded_share_of_the_training_file(tiny_checkpoint, sentiment_files, tmp_path):
    from featherlm.evaluate import evaluate

    train, _ = sentiment_files
    overrides = ["--model.name", tiny_checkpoint("bert"), "--data.train", str(train), "--data.eval_ratio", "0.25",
                 "--train.max_steps", "2", "--out.dir", str(tmp_path / "run"), "--out.plot", "false"]
    summary = finetune({}, overrides=overrides, progress=False)
    assert (summary["train_examples"], summary["eval_examples"]) == (72, 24)  # 96 rows: 25% held out
    again = evaluate(tmp_path / "run")  # the run's default eval data is the same held-out share
    assert again["n"] == 24
    assert again["accuracy"] == pytest.approx(summary["eval"]["accuracy"])
    with pytest.raises(ConfigError, match="not both"):
        finetune({}, overrides=[*overrides, "--data.eval", str(train)], progress=False)
