"""The public Python API: ``featherlm.load`` and ``LoadedModel`` on a tiny HF Llama folder with a
word-level tokenizer and a chat template, and on the embedded MiniLM encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import featherlm
from featherlm.errors import CheckpointError, ConfigError, GenerationError
from featherlm.model import Transformer
from featherlm.tokenizer import Tokenizer

WORDS = ("the a cat dog sat on mat and ran to park in sun Hi What is 2+2? four hello world quick brown fox jumps "
         "over lazy red blue green one two three big small tree house car road river sky bird fish system user "
         "assistant").split()
@pytest.fixture(scope="module")
def folder(tiny_chat_folder) -> Path:
    return tiny_chat_folder(WORDS)


@pytest.fixture(scope="module")
def lm(folder) -> featherlm.LoadedModel:
    return featherlm.load(folder)


@pytest.fixture(scope="module")
def minilm() -> featherlm.LoadedModel:
    return featherlm.load("minilm-l6")


PROMPTS = ["the cat sat on", "Hi", "a big brown dog ran to the park in"]


def test_load_returns_loaded_model_that_unpacks(lm, folder):
    assert isinstance(lm, featherlm.LoadedModel)
    model, tokenizer = lm
    assert isinstance(model, Transformer) and isinstance(tokenizer, Tokenizer)
    assert model is lm.model and tokenizer is lm.tokenizer and lm.config is model.config
    assert lm.kind == "hf" and lm.name == str(folder)
    assert lm.files == [folder / "config.json", folder / "model.safetensors"]
    assert not model.training


def test_generate_greedy(lm):
    result = lm.generate(PROMPTS[0], max_new_tokens=6)
    assert isinstance(result, featherlm.GenerationResult)
    assert result.timing.prompt_tokens == 4
    assert 1 <= result.timing.new_tokens <= 6 and 1 <= len(result.token_ids) <= 6
    assert result.text == lm.tokenizer.decode(result.token_ids)
    assert result.text.split()[0] in WORDS
    assert lm.generate(PROMPTS[0], max_new_tokens=6).text == result.text


def test_stream_pieces_concatenate_to_generate(lm):
    for prompt in PROMPTS:
        pieces = list(lm.stream(prompt, max_new_tokens=8))
        text = lm.generate(prompt, max_new_tokens=8).text
        assert "".join(pieces) == text
        assert len(pieces) == len(text.split())  # one word per token: streamed token by token


def test_generate_batch_equals_each_prompt_alone(lm):
    texts = lm.generate_batch(PROMPTS, max_new_tokens=6)
    assert texts == [lm.generate(p, max_new_tokens=6).text for p in PROMPTS]
    assert len(set(texts)) > 1


def test_options_reach_the_generation_config(lm):
    sampled = [lm.generate("the cat", max_new_tokens=10, temperature=1.0, seed=s).text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    full = lm.generate("the cat", max_new_tokens=10).text
    stop = " " + full.split()[2]
    cut = lm.generate("the cat", max_new_tokens=10, stop=[stop])
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    assert lm.generate("the cat", max_new_tokens=10, num_beams=2).timing.new_tokens <= 10
    with pytest.raises(GenerationError, match="top_p"):
        lm.generate("the cat", top_p=0.0)


def test_chat_messages_go_through_the_chat_template(lm):
    messages = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "What is 2+2?"}]
    rendered = "<|im_start|>system Hi<|im_end|><|im_start|>user What is 2+2?<|im_end|><|im_start|>assistant "
    assert lm.tokenizer.apply_chat_template(messages) == rendered
    result = lm.generate(messages, max_new_tokens=5)
    assert result.timing.prompt_tokens == len(lm.tokenizer.encode(rendered)) == 12
    assert result.text == lm.generate(rendered, max_new_tokens=5).text
    assert "".join(lm.stream(messages, max_new_tokens=5)) == result.text


def test_encoder_cannot_generate(minilm):
    model, tokenizer = minilm
    assert minilm.config.family == "bert" and not minilm.config.causal
    ids = tokenizer.encode("featherlm is small")
    out = model(torch.tensor([ids]))
    assert out.hidden.shape == (1, len(ids), 384)
    for call in (minilm.generate, minilm.stream):
        with pytest.raises(GenerationError, match="minilm-l6 is an encoder"):
            call("Hello")
    with pytest.raises(GenerationError, match="encoder"):
        minilm.generate_batch(["Hello"])


def test_model_without_tokenizer_cannot_generate_text(folder, tmp_path):
    bare = Path(shutil.copytree(folder, tmp_path / "bare"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    lm = featherlm.load(bare)
    assert lm.tokenizer is None and lm.info()["tokenizer_vocab_size"] is None
    with pytest.raises(GenerationError, match="no tokenizer"):
        lm.generate("the cat")


@pytest.mark.parametrize("dtype", ["int8", "float64", "bf 16"])
def test_bad_dtype_is_a_config_error(folder, dtype):
    with pytest.raises(ConfigError) as info:
        featherlm.load(folder, dtype=dtype)
    assert repr(dtype) in str(info.value) and "bfloat16" in str(info.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.float16])
def test_dtype_names_and_torch_dtypes(folder, dtype):
    lm = featherlm.load(folder, dtype=dtype)
    assert lm.model.embed_tokens.weight.dtype == (featherlm.DTYPES[dtype] if isinstance(dtype, str) else dtype)
    assert lm.info()["dtype"] == str(lm.model.embed_tokens.weight.dtype).removeprefix("torch.")


def test_missing_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError) as info:
        featherlm.load(tmp_path / "missing")
    assert info.value.path == str(tmp_path / "missing")


def test_info_keys_and_values(lm, folder, minilm):
    info = lm.info()
    assert list(info) == ["name", "kind", "family", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                          "head_dim", "vocab_size", "context_length", "parameters", "dtype", "stored_as",
                          "tokenizer_vocab_size", "files"]
    assert info["name"] == str(folder) and info["kind"] == "hf" and info["family"] == "llama"
    assert (info["n_layer"], info["n_head"], info["n_kv_head"], info["d_model"]) == (2, 4, 2, 32)
    assert info["vocab_size"] == info["tokenizer_vocab_size"] == len(WORDS) + 3
    assert info["context_length"] == 64 and info["dtype"] == "float32" and info["stored_as"] == "float32"
    assert info["parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert info["files"] == [str(folder / "config.json"), str(folder / "model.safetensors")]
    bert = minilm.info()
    assert (bert["family"], bert["n_layer"], bert["d_model"], bert["kind"]) == ("bert", 6, 384, "hf")
