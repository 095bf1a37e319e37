"""Sliding-window perplexity against transformers running the recipe of its own guide
("Perplexity of fixed-length models") on the same weights: a tiny random model exported with
``export_hf`` (fast), and the embedded SmolLM2 on a Tiny Shakespeare slice (slow).

WikiText-2, the set the guide uses, is not in ../shared/data; Tiny Shakespeare is real English text
and what the figure in docs/benchmarks.md is computed on.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import featherlm
from featherlm.errors import ConfigError
from featherlm.evaluate.perplexity import perplexity, windows

WORDS = ["the", "king", "queen", "said", "and", "to", "my", "lord", "is", "not", "a", "good", "night", "thou",
         "art", "of", "in", "that", "what", "shall", "we", "do", "now", ",", ".", "!"]


def hf_guide(hf_model, ids: list[int], window: int, stride: int) -> tuple[float, float, int]:
    """The guide's loop, as published: (its perplexity, the exact summed NLL of the tokens it
    scores, how many). The guide weights each window's mean loss by (targets - 1); the exact sum
    is recomputed from per-token losses of the same forward passes."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, exact, exact_n, prev_end_loc = 0.0, 0, 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + window, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = hf_model(input_ids, labels=target_ids)
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += outputs.loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        per_token = F.cross_entropy(outputs.logits[0, :-1].float(), target_ids[0, 1:], reduction="none",
                                    ignore_index=-100)
        exact += float(per_token.sum())
        exact_n += int((target_ids[0, 1:] != -100).sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), exact, exact_n


@pytest.fixture(scope="module")
def tiny_pair(tiny_chat_folder):
    """(featherlm LoadedModel, transformers model) of one random tiny Llama (context 64)."""
    from transformers import LlamaForCausalLM

    folder = tiny_chat_folder(WORDS, context=64, seed=3)
    return featherlm.load(folder), LlamaForCausalLM.from_pretrained(folder).eval()


def sample_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.mark.parametrize("window,stride", [(64, 32), (32, 8), (32, 32), (17, 5), (64, 64)])
def test_equals_transformers_guide_on_a_tiny_model(tiny_pair, window, stride):
    lm, hf = tiny_pair
    text = sample_text(230)
    ids = lm.tokenizer.encode(text)
    ours = perplexity(lm.model, lm.tokenizer, text, window=window, stride=stride, batch_size=3)
    guide_ppl, exact, exact_n = hf_guide(hf, ids, window, stride)
    assert ours["tokens"] == exact_n
    assert ours["nll"] * ours["tokens"] == pytest.approx(exact, rel=1e-5)
    if stride >= 8:
        # the guide's figure weights each window by (targets - 1): with few targets per window on a
        # random model that bias reaches ~0.6% (17/5 here); the exact sums above agree in every case
        assert ours["perplexity"] == pytest.approx(guide_ppl, rel=5e-3)
    assert (ours["window"], ours["stride"]) == (window, stride)
    assert ours["bits_per_byte"] == pytest.approx(exact / math.log(2) / len(text.encode()), rel=1e-5)


def test_defaults_are_the_context_and_half_of_it(tiny_pair):
    lm, hf = tiny_pair
    text = sample_text(150, seed=1)
    ours = perplexity(lm.model, lm.tokenizer, text)
    assert (ours["window"], ours["stride"]) == (64, 32)
    assert ours["perplexity"] == pytest.approx(hf_guide(hf, lm.tokenizer.encode(text), 64, 32)[0], rel=5e-3)


def test_a_text_within_one_window_is_scored_in_one_pass(tiny_pair):
    lm, hf = tiny_pair
    text = sample_text(40, seed=2)
    ids = torch.tensor([lm.tokenizer.encode(text)])
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss.item()  # plain causal LM loss over every token after the first
    ours = perplexity(lm.model, lm.tokenizer, text)
    assert ours["windows"] == 1 and ours["tokens"] == ids.shape[1] - 1
    assert ours["nll"] == pytest.approx(loss, rel=1e-5)


def test_every_token_is_scored_once_with_enough_context():
    for n, window, stride in [(100, 16, 4), (100, 16, 16), (7, 16, 8), (33, 10, 3), (2, 2, 1)]:
        spans = windows(n, window, stride)
        scored = [t for begin, end, s in spans for t in range(end - s, end)]
        assert len(scored) == len(set(scored))
        if stride < window:
            assert sorted(scored) == list(range(1, n))
            for begin, end, s in spans[1:]:
                assert end - s - begin >= window - stride  # left context of the first scored token
        else:  # no overlap: each window's first token has no context and is skipped, as in the guide
            assert sorted(scored) == [t for t in range(1, n) if t % window]


def test_bits_per_byte_counts_utf8_bytes(tiny_pair):
    lm, _ = tiny_pair
    text = sample_text(60, seed=4) + " é" * 5  # unknown words, two bytes per é
    result = perplexity(lm.model, lm.tokenizer, text, window=32, stride=16)
    assert result["bytes"] == len(text) + 5
    assert result["bits_per_byte"] == pytest.approx(result["nll"] * result["tokens"] / math.log(2) / (len(text) + 5))


def test_bf16_and_batching(tiny_pair):
    lm, _ = tiny_pair
    text = sample_text(200, seed=5)
    one = perplexity(lm.model, lm.tokenizer, text, window=32, stride=8, batch_size=1)
    many = perplexity(lm.model, lm.tokenizer, text, window=32, stride=8, batch_size=8)
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5)
    low = perplexity(lm.model, lm.tokenizer, text, window=32, stride=8, bf16=True)
    assert low["nll"] == pytest.approx(one["nll"], rel=0.05)


def test_bad_settings(tiny_pair, tiny_model):
    lm, _ = tiny_pair
    with pytest.raises(ConfigError, match="longer than the model's context"):
        perplexity(lm.model, lm.tokenizer, "the king", window=65)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(lm.model, lm.tokenizer, "the king", window=16, stride=17)
    with pytest.raises(ConfigError, match="at least 2"):
        perplexity(lm.model, lm.tokenizer, "king")
    with pytest.raises(ConfigError, match="encoder"):
        perplexity(tiny_model("bert"), lm.tokenizer, "the king")


@pytest.mark.slow
def test_smollm2_equals_transformers_on_shakespeare(smollm2_reference, shared_data):
    """SmolLM2 (float32, the same dequantised GGUF weights on both sides) on the first 6,000
    characters of Tiny Shakespeare, window 512, stride 256: within 0.5% of the guide's figure."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = (shared_data / "corpus" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:6000]
    lm = featherlm.load("smollm2-135m-instruct")
    config = smollm2_reference["config"]
    hf = LlamaForCausalLM(LlamaConfig(**config))
    hf.load_state_dict(smollm2_reference["tensors"], strict=False)
    hf.tie_weights()
    hf.eval()
    ours = perplexity(lm.model, lm.tokenizer, text, window=512, stride=256)
    guide_ppl, exact, exact_n = hf_guide(hf, lm.tokenizer.encode(text), 512, 256)
    assert ours["tokens"] == exact_n
    assert ours["perplexity"] == pytest.approx(guide_ppl, rel=5e-3)
    assert ours["nll"] * ours["tokens"] == pytest.approx(exact, rel=1e-3)
    assert 1.0 < ours["perplexity"] < 100.0  # a real model on real English, not noise
    print(f"\nSmolLM2 on Tiny Shakespeare[:6000], window 512, stride 256: {ours['tokens']} tokens; featherlm "
          f"perplexity {ours['perplexity']:.4f} ({ours['bits_per_byte']:.4f} bits/byte), transformers (the guide's "
          f"loop) {guide_ppl:.4f}, exact per-token {math.exp(exact / exact_n):.4f}; "
          f"ratio {ours['perplexity'] / guide_ppl:.5f}")  # the figure in docs/benchmarks.md (pytest -s)
