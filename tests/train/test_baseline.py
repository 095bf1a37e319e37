"""Training the classic baselines: LM baselines on contiguous text, classifiers on task files, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from featherlm.cli import main
from featherlm.config import preset
from featherlm.errors import ConfigError
from featherlm.model import Transformer
from featherlm.model.baselines import KneserNeyLM, RecurrentLM
from featherlm.tokenizer import char_tokenizer
from featherlm.train.baseline import (
    encode_text,
    evaluate_recurrent,
    evaluate_windows,
    split_ids,
    streams,
    train_classifier_baseline,
    train_lm_baseline,
)

PATTERN = [1, 2, 3, 4, 5, 6, 7, 0] * 150  # 1,200 tokens that a bigram predicts exactly


def test_streams_and_split_are_contiguous():
    ids = list(range(103))
    s = streams(ids, 4)
    assert s.shape == (4, 25) and s[1, 0] == 25 and s[3, -1] == 99  # the tail that does not divide is dropped
    train, val = split_ids(ids, 0.1)
    assert train + val == ids and len(val) == 11
    with pytest.raises(ConfigError):
        split_ids([1, 2, 3], 0.1)


def test_char_encoding_round_trips_through_the_saved_tokenizer(tmp_path):
    text = "To be, or not to be:\n  that is\tthe question.\n"
    ids, vocab, decode, tok = encode_text(text, "char")
    assert len(ids) == len(text) and decode(ids) == text and vocab == tok.vocab_size
    assert {decode([i]) for i in ids} == set(text)  # one id per character
    tok.save(tmp_path)
    from featherlm.tokenizer import Tokenizer

    assert Tokenizer.from_dir(tmp_path).encode(text, add_special_tokens=False) == ids


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_recurrent_baselines_learn_a_pattern_with_truncated_bptt(kind, tmp_path):
    train, val = PATTERN[:1000], PATTERN[1000:]
    result = train_lm_baseline(kind, train, val, vocab_size=8, time_budget_s=60, max_steps=120, d_model=32,
                               n_layer=1, seq_len=16, batch_size=8, lr=1e-2, dropout=0.0, out=tmp_path / kind)
    # 8 streams of 125 tokens = 124 (input, target) pairs each, read in windows of 16: 7 full windows and
    # one of 12 per pass, so 120 steps are 15 passes
    assert result["steps"] == 120 and result["tokens_seen"] == 15 * 8 * 124
    assert result["val_bits_per_token"] < 0.2, result  # uniform would be 3 bits
    assert result["val_tokens"] == len(val) - 1  # one stream: every token after the first is scored
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    saved = RecurrentLM.load(tmp_path / kind)  # the saved model scores the same
    assert evaluate_recurrent(saved, val)["nll"] == pytest.approx(result["val_loss"], rel=1e-5)


def test_ngram_baseline_reports_bits_and_saves(tmp_path):
    result = train_lm_baseline("ngram", PATTERN[:1000], PATTERN[1000:], vocab_size=8, time_budget_s=1, order=3,
                               out=tmp_path)
    assert result["val_tokens"] == 200 and result["params"] > 0
    assert result["val_bits_per_token"] == pytest.approx(result["val_loss"] / math.log(2))
    assert result["val_bits_per_token"] < 0.5
    assert KneserNeyLM.load(tmp_path / "ngram.json").evaluate(PATTERN[1000:])["nll"] == pytest.approx(
        result["val_loss"])


def test_windowed_scoring_of_a_transformer_scores_every_token_once():
    from featherlm.train.gan import validation_loss

    torch.manual_seed(0)
    model = Transformer(preset("llama", n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=32, vocab_size=11,
                               max_seq_len=32))
    ids = torch.randint(11, (1 + 8 * 7,))  # 57 ids: 56 targets, 7 whole windows of 8
    with torch.no_grad():
        whole = F.cross_entropy(model(ids[None, :32]).logits[0, :31], ids[1:32])
    assert evaluate_windows(model, ids[:32], block=32)["nll"] == pytest.approx(float(whole), rel=1e-5)
    consecutive = evaluate_windows(model, ids, block=8, stride=8)  # nanoGPT's windows, as the GAN module scores
    assert consecutive["nll"] == pytest.approx(validation_loss(model, ids, 8), rel=1e-5)
    for block, stride in ((8, 4), (8, 1), (16, 5), (32, 16)):
        scores = evaluate_windows(model, ids, block=block, stride=stride)
        assert scores["tokens"] == 56  # each target once, none skipped
        assert scores["bits_per_token"] == pytest.approx(scores["nll"] / math.log(2))
    # stride 1: the first window scores targets 1..8 from all ids before them, every later target is scored
    # from the 8 ids before it
    with torch.no_grad():
        per_target = [float(F.cross_entropy(model(ids[None, max(0, j - 8):j]).logits[0, -1:], ids[j:j + 1]))
                      for j in range(1, ids.numel())]
    assert evaluate_windows(model, ids, block=8, stride=1)["nll"] == pytest.approx(sum(per_target) / 56, rel=1e-5)
    with pytest.raises(ConfigError, match="stride must be in"):
        evaluate_windows(model, ids, block=8, stride=9)


def test_lm_baseline_refuses_unknown_kinds():
    with pytest.raises(ConfigError, match="unknown LM baseline"):
        train_lm_baseline("transformer", PATTERN, PATTERN, 8, time_budget_s=1)


@pytest.mark.parametrize("kind", ["textcnn", "bilstm"])
def test_classifier_baselines_learn_toy_sentiment(kind, sentiment_files, tiny_checkpoint):
    train, dev = sentiment_files
    result = train_classifier_baseline(kind, train, dev, tiny_checkpoint("bert"), epochs=8, batch_size=16,
                                       lr=1e-2, d_model=32, seed=0)
    assert result["eval_examples"] == 32 and result["labels"] == ["0", "1"]
    assert result["steps"] == 8 * 6
    assert result["accuracy"] >= 0.9, result["eval"]
    assert sum(map(sum, result["eval"]["confusion"])) == 32


def test_cli_baseline_json(tmp_path, capsys, sentiment_files, tiny_checkpoint):
    text = tmp_path / "tiny.txt"
    text.write_text("the cat sat on the mat. " * 60)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # a real process, as a user runs it
    argv = ["baseline", "lm", "--kind", "gru", "--data", str(text), "--time-budget", "1", "--d-model", "16",
            "--n-layer", "1", "--batch-size", "4", "--seq-len", "16", "--sample", "20", "--json"]
    lm = subprocess.Popen([sys.executable, "-m", "featherlm.cli", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)

    train, dev = sentiment_files  # meanwhile, in this process
    rc = main(["baseline", "classify", "--kind", "textcnn", "--data", str(train), "--eval-data", str(dev),
               "--tokenizer", tiny_checkpoint("bert"), "--epochs", "1", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kind"] == "textcnn" and result["eval"]["n"] == 32 and 0 <= result["accuracy"] <= 1
    rc = main(["baseline", "lm", "--kind", "lstm", "--data", str(tmp_path / "missing.txt"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.strip().count("\n") == 0 and "missing.txt: no such file" in err

    out, err = lm.communicate(timeout=240)
    assert lm.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    content = text.read_text()
    assert result["kind"] == "gru" and result["vocab_size"] == char_tokenizer([content]).vocab_size
    n = len(content)
    assert result["val_tokens"] == n - int(n * 0.9) - 1  # the last 10%, all but its first character scored
    # 8 validation characters as the prompt, then 20 sampled (special tokens, if sampled, decode to nothing)
    assert result["steps"] > 0 and result["sample"].startswith(content[int(n * 0.9):][:8])
    assert 8 < len(result["sample"]) <= 28
