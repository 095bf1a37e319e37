"""The real SmolLM2-135M-Instruct against Hugging Face transformers, same dequantised weights.

transformers builds its model from its own GGUF reader (conftest.smollm2_reference), so a fault in
featherlm's reader, name map, RoPE, GQA, masking or sampling shows up here.
"""

from __future__ import annotations

import pytest
import torch

import featherlm
from featherlm.generate import GenerationConfig, generate_ids, left_pad


@pytest.fixture(scope="module")
def ours():
    return featherlm.load("smollm2-135m-instruct")  # float32


@pytest.fixture(scope="module")
def theirs(smollm2_reference):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in smollm2_reference["config"].items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = model.load_state_dict(smollm2_reference["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to embed_tokens
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model


def sentences(shared_data, n: int) -> list[str]:
    lines = (shared_data / "sentiment" / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines[:n]]


def test_logits_match_transformers_on_a_padded_batch(ours, theirs, shared_data):
    texts = sentences(shared_data, 6)
    ids, mask = left_pad([ours.tokenizer.encode(t) for t in texts], pad_id=ours.tokenizer.pad_id)
    assert (mask == 0).any(), "the batch must contain padding"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref = theirs(ids, attention_mask=mask, position_ids=positions).logits
        got = ours.model(ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (ref - got)[real].abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.2e}"
    assert ref[real].abs().max() > 1.0  # real logits, not zeros


@pytest.mark.parametrize("question", ["What is the capital of France?", "Write a short poem about the sea."])
def test_greedy_32_tokens_identical_to_transformers(ours, theirs, question):
    prompt = ours.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    ids = ours.tokenizer.encode(prompt)
    new = generate_ids(ours.model, [ids], GenerationConfig(max_new_tokens=32), eos_ids=set())[0]
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, eos_token_id=None, pad_token_id=ours.tokenizer.pad_id)
    assert new == out[0, len(ids):].tolist()
    assert len(new) == 32


def test_batched_left_padded_greedy_equals_single_prompts(ours):
    prompts = [ours.tokenizer.apply_chat_template([{"role": "user", "content": q}])
               for q in ("Hi!", "Name three colours of the rainbow, please.")]
    encoded = [ours.tokenizer.encode(p) for p in prompts]
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate_ids(ours.model, encoded, cfg, eos_ids=set(), pad_id=ours.tokenizer.pad_id)
    single = [generate_ids(ours.model, [e], cfg, eos_ids=set())[0] for e in encoded]
    assert batched == single


def test_chat_answer_is_sensible_and_stops_at_end_of_turn(ours):
    result = ours.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40)
    assert "Paris" in result.text
    assert result.finish_reason == "stop" and result.timing.new_tokens < 40
