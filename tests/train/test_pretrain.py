"""`featherlm pretrain`: the loop learns, resumes exactly, saves a model featherlm loads, and the CLI
reports one JSON line; encoders pretrained with MLM fine-tune through the classification path."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import featherlm
from featherlm.checkpoint import read_checkpoint
from featherlm.cli import main
from featherlm.errors import ConfigError, DataError
from featherlm.model.baselines import KneserNeyLM, RecurrentLM
from featherlm.tokenizer import Tokenizer
from featherlm.train import finetune
from featherlm.train import pretrain as pretrain_module
from featherlm.train.config import load_config
from featherlm.train.pretrain import pretrain
from featherlm.train.pretrain_config import load_pretrain_config
from featherlm.train.run import base_checkpoint

TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "32", "--train.block_size", "16",
        "--train.batch_size", "8", "--train.warmup_steps", "2", "--train.eval_iters", "2", "--train.log_every", "1",
        "--out.plot", "false"]


WORDS = ["the", "movie", "film", "was", "is", "a", "plot", "acting", "really", "very", "story", "and", "but", "cast"]
ENDINGS = ["good", "great", "fine", "bad", "awful", "dull"]


@pytest.fixture
def corpus(tmp_path):
    """~8,000 characters of toy sentences: learnable structure (words, spaces, full stops)."""
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        words = rng.sample(WORDS, rng.randint(2, 5)) + [rng.choice(ENDINGS)]
        lines.append(" ".join(words) + ".")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def settings(data, out, *extra) -> list[str]:
    return ["--data.train", str(data), "--out.dir", str(out), *TINY, *extra]


def train_records(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in rows]


def test_loss_decreases_and_the_model_loads(corpus, tmp_path):
    out = tmp_path / "run"
    result = pretrain({}, overrides=settings(corpus, out, "--train.max_steps", "40", "--train.lr", "1e-2",
                                             "--train.eval_every", "20", "--train.sample_every", "20",
                                             "--train.sample_tokens", "12"), progress=False)
    records = train_records(out)
    evals = [r for r in records if r["split"] == "eval"]
    vocab = result["vocab_size"]
    assert [r["step"] for r in evals] == [20, 40]
    assert result["steps"] == 40 and result["tokens"] == 40 * 8 * 16 and result["finished"]
    assert result["val_loss"] == evals[-1]["loss"] < 0.75 * math.log(vocab)  # well below a uniform guess
    assert result["val_bits_per_token"] == pytest.approx(result["val_loss"] / math.log(2))
    trains = [r["loss"] for r in records if r["split"] == "train"]
    assert trains[-1] < trains[0] - 1.0
    samples = [r["text"] for r in records if r["split"] == "sample"]
    assert len(samples) == 2 and all(isinstance(s, str) and s for s in samples)

    lm = featherlm.load(out / "model")  # the model folder is a featherlm folder with its tokenizer
    assert lm.config.family == "gpt2" and lm.config.vocab_size == vocab and lm.config.max_seq_len == 16
    text = (corpus.read_text()[:200])
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text  # the char tokenizer round-trips
    ids = torch.tensor([lm.tokenizer.encode("the movie was ")])
    assert lm.model(ids).logits.shape == (1, ids.shape[1], vocab)
    assert isinstance(lm.generate("the ", max_new_tokens=5).text, str)
    saved = load_file(str(out / "last" / "trainer_state.safetensors"))  # the checkpoint holds the same weights
    for name, p in lm.model.state_dict().items():
        assert torch.equal(saved[f"model.backbone.{name}"], p), name


def test_resume_continues_the_same_curve(corpus, tmp_path):
    extra = ["--train.max_steps", "9", "--train.eval_every", "4", "--train.log_every", "2", "--train.lr", "5e-3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    pretrain({}, overrides=settings(corpus, whole, *extra), progress=False)
    first = pretrain({}, overrides=settings(corpus, split, *extra), stop_after=5, progress=False)
    assert first["stopped"] == "stop_after" and first["steps"] == 5 and not first["finished"]
    second = pretrain({}, overrides=settings(corpus, split, *extra), resume=True, progress=False)
    assert second["finished"] and second["steps"] == 9
    resumed = train_records(split)
    stop_eval = [r for r in resumed if r["step"] == 5 and r["split"] == "eval"]  # the stop also estimated val loss
    assert len(stop_eval) == 1 and stop_eval[0]["loss"] == first["val_loss"]
    assert [r for r in resumed if r not in stop_eval] == train_records(whole)  # every loss, lr, grad norm, eval
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(split / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match="differs in train.lr"):
        pretrain({}, overrides=settings(corpus, split, *extra, "--train.lr", "1e-3"), resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain({}, overrides=settings(corpus, split, *extra), progress=False)
    with pytest.raises(ConfigError, match="nothing to resume"):
        pretrain({}, overrides=settings(corpus, tmp_path / "none", *extra), resume=True, progress=False)


def test_time_budget_stops_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    result = pretrain({}, overrides=settings(corpus, out, "--train.max_steps", "1000",
                                             "--train.time_budget_s", "0.001"), progress=False)
    assert result["stopped"] == "time_budget" and result["steps"] == 1
    assert math.isfinite(result["val_loss"])
    assert (out / "model" / "model.safetensors").is_file() and (out / "last" / "trainer_state.json").is_file()


def test_time_schedule_decays_over_the_budget(corpus, tmp_path):
    out = tmp_path / "run"
    result = pretrain({}, overrides=settings(corpus, out, "--train.max_steps", "100000", "--train.schedule", "time",
                                             "--train.time_budget_s", "2", "--train.eval_every", "0",
                                             "--train.warmup_steps", "1"), progress=False)
    assert result["stopped"] == "time_budget" and 3 <= result["steps"] < 100000
    lrs = [r["lr"] for r in train_records(out) if r["split"] == "train"][1:]  # after the warmup step
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.3 * 1e-3  # cosine towards min_lr 1e-4 at 2 s
    with pytest.raises(ConfigError, match="set it"):
        load_pretrain_config({"data": {"train": str(corpus)}, "train": {"schedule": "time"}})


def test_cpu_clock_budget_counts_process_time(corpus, tmp_path, monkeypatch):
    """train.clock cpu: the budget and the schedule read CPU seconds of the process (a fake clock that
    advances one second per reading), not wall time."""
    readings = iter(range(1000))

    class FakeTime:
        perf_counter = staticmethod(pretrain_module.time.perf_counter)
        strftime = staticmethod(pretrain_module.time.strftime)

        @staticmethod
        def process_time() -> float:
            return float(next(readings))

    monkeypatch.setattr(pretrain_module, "time", FakeTime)
    out = tmp_path / "run"
    result = pretrain({}, overrides=settings(corpus, out, "--train.max_steps", "1000", "--train.clock", "cpu",
                                             "--train.schedule", "time", "--train.time_budget_s", "4",
                                             "--train.eval_every", "0", "--train.warmup_steps", "0"), progress=False)
    assert result["stopped"] == "time_budget" and result["steps"] == 4  # CPU "seconds" 1, 2, 3, 4
    assert result["clock"] == "cpu" and result["elapsed_s"] == 4
    lrs = [r["lr"] for r in train_records(out) if r["split"] == "train"]
    assert lrs[0] == 1e-3 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-3  # decays over CPU seconds
    wall = pretrain({}, overrides=settings(corpus, tmp_path / "wall", "--train.max_steps", "3"), progress=False)
    assert wall["clock"] == "wall" and wall["steps"] == 3


def test_cli_json_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "--model", "llama", "--data", str(corpus), "--out", str(out), *TINY,
               "--model.n_kv_head", "1", "--train.max_steps", "3", "--tokenizer", "bpe", "--data.vocab_size", "300",
               "--json"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    for key in ("val_loss", "train_loss", "steps", "tokens", "tokens_per_s", "time_s", "run_dir"):
        assert key in result, key
    assert result["run_dir"] == str(out) and result["steps"] == 3 and result["arch"] == "llama"
    lm = featherlm.load(out / "model")
    config = lm.config
    assert (config.family, config.n_head, config.n_kv_head, config.d_model) == ("llama", 2, 1, 32)
    assert lm.tokenizer.backend.get_vocab_size() == config.vocab_size <= 300  # a BPE trained on the training text
    assert lm.tokenizer.decode(lm.tokenizer.encode("the plot was dull.")) == "the plot was dull."


@pytest.mark.parametrize(("argv", "message"), [
    (["--train.lrr", "1"], "unknown key 'lrr'; did you mean 'lr'"),
    (["--model", "gpt", "--objective.kind", "mlm"], "objective mlm trains an encoder"),
    (["--train.batch_size", "6", "--train.grad_accum", "4"], "not a multiple of train.grad_accum"),
    (["--model.d_model", "30", "--model.n_head", "4"], "not divisible by n_head"),
    (["--model", "gpt", "--model.dropout", "0.1"], "transformer has no dropout"),
    (["--data", "missing.txt"], "missing.txt: no such file"),
])
def test_bad_config_is_one_line_error(corpus, tmp_path, capsys, argv, message):
    base = ["pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), "--train.max_steps", "2"]
    rc = main([*base, *argv])
    stdout, err = capsys.readouterr()
    assert rc == 2 and stdout == ""
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("featherlm pretrain: error:")
    assert not (tmp_path / "run").exists()  # nothing was written


def test_config_errors_from_python(corpus):
    with pytest.raises(ConfigError, match="data.train is required"):
        load_pretrain_config({})
    with pytest.raises(ConfigError, match="objective.nsp goes with objective mlm"):
        load_pretrain_config({"data": {"train": str(corpus)}, "objective": {"nsp": True}})
    with pytest.raises(ConfigError, match="objective span corrupts encoder-decoder inputs"):
        load_pretrain_config({"data": {"train": str(corpus)}, "objective": {"kind": "span"}})
    with pytest.raises(ConfigError, match="objective.mask_prob must be in"):
        load_pretrain_config({"data": {"train": str(corpus)}, "model": {"arch": "bert"},
                              "objective": {"mask_prob": 1.5}})
    assert load_pretrain_config({"data": {"train": str(corpus)}, "model": {"arch": "t5"}}).objective.kind == "span"
    config = load_pretrain_config({"data": {"train": str(corpus)}, "model": {"arch": "bert"}})
    assert config.objective.kind == "mlm"  # auto: the objective of the family
    post = config.model_config(vocab_size=100)
    assert (post.norm_position, post.final_norm) == ("post", False)  # BERT's own block
    config = load_pretrain_config({"data": {"train": str(corpus)}, "model": {"arch": "bert", "norm_position": "pre"}})
    pre = config.model_config(vocab_size=100)
    assert (pre.norm_position, pre.final_norm) == ("pre", True)
    assert {**pre.to_dict(), "norm_position": "post", "final_norm": False} == post.to_dict()
    with pytest.raises(ConfigError, match="model.norm_position is a bert option"):
        load_pretrain_config({"data": {"train": str(corpus)}, "model": {"norm_position": "pre"}})
    config = load_pretrain_config({"data": {"train": str(corpus)}, "model": {"arch": "bert", "position": "rope"}})
    assert config.model_config(vocab_size=100).position == "rope" and post.position == "learned"
    with pytest.raises(ConfigError, match="model.position is a bert option"):
        load_pretrain_config({"data": {"train": str(corpus)}, "model": {"arch": "gpt", "position": "rope"}})


def test_short_data_is_a_data_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abc\n" * 5)
    with pytest.raises(DataError, match="needs 17"):
        pretrain({}, overrides=settings(path, tmp_path / "run", "--train.max_steps", "1"), progress=False)


def test_bert_mlm_pretraining_then_classification_finetuning(corpus, tmp_path, sentiment_files):
    out = tmp_path / "bert"
    result = pretrain({}, overrides=settings(corpus, out, "--model.arch", "bert", "--objective.nsp", "true",
                                             "--train.max_steps", "30", "--train.lr", "5e-3",
                                             "--train.eval_every", "15"), progress=False)
    assert result["objective"] == "mlm"
    evals = [r for r in train_records(out) if r["split"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] and "nsp_loss" in evals[-1]
    assert 0 < evals[-1]["tokens"] < 2 * 0.15 * 2 * 8 * 16  # only the masked positions are scored

    tok = Tokenizer.from_dir(out / "model")
    ids = tok.encode("the movie")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id  # encode wraps as pretraining did: <s> ... </s>
    train, dev = sentiment_files
    tuned = finetune({}, overrides=["--model.name", str(out / "model"), "--model.task", "classification",
                                    "--data.train", str(train), "--data.eval", str(dev), "--peft.method", "full",
                                    "--train.max_steps", "4", "--train.batch_size", "8", "--train.max_seq_len", "16",
                                    "--out.dir", str(tmp_path / "ft"), "--out.plot", "false"], progress=False)
    assert tuned["finished"] and 0 <= tuned["eval"]["accuracy"] <= 1

    # the baseline of the same architecture from random weights: scratch:bert sized as featherlm.json says
    pretrained = read_checkpoint(out / "model")
    c = pretrained.config
    sizes = {k: getattr(c, k) for k in ("n_layer", "n_head", "d_model", "d_ff", "max_seq_len", "position",
                                        "norm_position", "final_norm")}
    scratch = base_checkpoint(load_config({"model": {"name": "scratch:bert", "tokenizer": str(out / "model"),
                                                     "overrides": sizes},
                                           "data": {"train": str(train)}, "peft": {"method": "full"}}))
    ids = dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"))  # the encoder does not use them
    assert {**scratch.config.to_dict(), **ids} == {**c.to_dict(), **ids}
    assert scratch.config.pad_token_id == c.pad_token_id
    assert {k: v.shape for k, v in scratch.state_dict.items()} == {k: v.shape for k, v in pretrained.state_dict.items()}
    assert not torch.equal(scratch.state_dict["embed_tokens.weight"], pretrained.state_dict["embed_tokens.weight"])


def test_recurrent_and_ngram_baselines(corpus, tmp_path):
    lstm = pretrain({}, overrides=settings(corpus, tmp_path / "lstm", "--model.arch", "lstm", "--train.max_steps",
                                           "20", "--train.lr", "1e-2", "--model.dropout", "0.1"), progress=False)
    assert lstm["arch"] == "lstm" and lstm["val_loss"] < math.log(lstm["vocab_size"])
    model = RecurrentLM.load(tmp_path / "lstm" / "model")
    assert model.config.cell == "lstm" and model.config.d_model == 32
    assert Tokenizer.from_dir(tmp_path / "lstm" / "model").vocab_size == lstm["vocab_size"]

    ngram = pretrain({}, overrides=settings(corpus, tmp_path / "ngram", "--model.arch", "ngram", "--model.order",
                                            "3"), progress=False)
    tok = Tokenizer.from_dir(tmp_path / "ngram" / "tokenizer")
    text = corpus.read_text()
    cut = int(len(text) * 0.9)
    reference = KneserNeyLM(3, vocab_size=tok.vocab_size).fit(tok.encode(text[:cut], add_special_tokens=False))
    expected = reference.evaluate(tok.encode(text[cut:], add_special_tokens=False))
    assert ngram["val_loss"] == pytest.approx(expected["nll"])  # the same split and ids as the transformer's
    assert ngram["val_bits_per_token"] == pytest.approx(expected["bits_per_token"])
    assert KneserNeyLM.load(tmp_path / "ngram" / "model" / "ngram.json").order == 3


def test_t5_span_corruption_pretraining_resumes_and_loads(corpus, tmp_path):
    out = tmp_path / "t5"
    extra = ["--model.arch", "t5", "--train.block_size", "24", "--train.max_steps", "24", "--train.lr", "1e-2",
             "--train.eval_every", "12"]
    first = pretrain({}, overrides=settings(corpus, out, *extra), stop_after=12, progress=False)
    assert first["objective"] == "span" and first["steps"] == 12
    second = pretrain({}, overrides=settings(corpus, out, *extra), resume=True, progress=False)  # tied embeddings
    assert second["finished"] and second["val_loss"] < first["val_loss"]
    lm = featherlm.load(out / "model")
    assert lm.config.family == "t5" and lm.config.encoder_decoder
    tok = lm.tokenizer
    sentinel = tok.token_to_id("<extra_id_0>")
    assert sentinel is not None and sentinel in tok.backend.get_added_tokens_decoder()  # a special token
    source = torch.tensor([tok.encode("the movie <extra_id_0> good.", add_special_tokens=False)])
    start = torch.tensor([[lm.config.decoder_start_token_id]])
    assert lm.model(source, decoder_input_ids=start).logits.shape == (1, 1, lm.config.vocab_size)


def test_token_shards_from_data_prepare(corpus, tmp_path):
    from featherlm.data import PrepareConfig, TokenShards, prepare_corpus

    data = tmp_path / "shards"
    prepare_corpus([corpus], "char", data, PrepareConfig(doc_split="line", dedup=(), val_ratio=0.1))
    out = tmp_path / "run"
    result = pretrain({}, overrides=settings(data, out, "--train.max_steps", "4"), progress=False)
    train, val = TokenShards(data, "train"), TokenShards(data, "val")
    assert result["steps"] == 4 and result["vocab_size"] == train.vocab_size
    assert train_records(out)[-1]["tokens"] == 2 * 8 * 16  # eval_iters windows of the val split
    assert val.num_tokens > 2 * 8 * 16
    tok = Tokenizer.from_dir(out / "model")  # the shards' own tokenizer travels with the model
    assert tok.backend.get_vocab() == Tokenizer.from_dir(data / "tokenizer").backend.get_vocab()
