"""The encoder-decoder (T5) in the one core: relative position buckets and init against transformers,
cached decoding against teacher forcing, padding, the shared embedding, and PEFT on both stacks."""

from __future__ import annotations

import pytest
import torch

from featherlm.config import preset
from featherlm.errors import ConfigError
from featherlm.generate import GenerationConfig, generate_ids
from featherlm.model import Seq2SeqTransformer, Transformer, new_model
from featherlm.model.layers import relative_buckets
from featherlm.peft import PeftConfig, apply, load_adapter, save_adapter

VOCAB = 61


def tiny_t5(seed: int = 0, **overrides) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, d_model=32, n_head=4, d_ff=64, relative_buckets=8, relative_max_distance=16)
    config = preset("t5", **{**sizes, **overrides})
    return new_model(config).eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "distance"), [(32, 128), (8, 16), (6, 7)])
def test_relative_buckets_match_transformers(bidirectional, buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None, :] - torch.arange(0, 5)[:, None]  # (5, 601) key minus query
    expected = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                                     max_distance=distance)
    got = relative_buckets(rel, bidirectional, buckets, distance)
    assert torch.equal(got, expected)
    assert got.max() == buckets - 1  # far distances reach the last bucket


def test_t5_init_follows_transformers():
    """Per-parameter standard deviations of a fresh model match transformers' T5 init (within sampling
    noise): with unscaled scores, q_proj must start much smaller than k_proj."""
    from transformers import T5Config, T5ForConditionalGeneration

    from featherlm.checkpoint.hf import featherlm_to_hf

    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=256, num_layers=2,
                                             num_heads=4, feed_forward_proj="gated-gelu"))
    ours = tiny_t5(d_model=64, d_ff=256, vocab_size=500, mlp="gated", activation="gelu_tanh", relative_buckets=32,
                   relative_max_distance=128)
    theirs = dict(hf.named_parameters())
    for name, tensor in featherlm_to_hf(dict(ours.named_parameters()), ours.config).items():
        if tensor.dim() == 1:  # norms start at 1
            assert torch.equal(tensor, theirs[name]), name
            continue
        ratio = tensor.std().item() / theirs[name].std().item()
        assert 0.8 < ratio < 1.25, (name, ratio)


@pytest.mark.parametrize("mlp", ["plain", "gated"])
def test_cached_decoding_equals_teacher_forcing(mlp):
    model = tiny_t5(mlp=mlp, activation="relu" if mlp == "plain" else "gelu_tanh")
    src, tgt = ids(2, 9, 1), ids(2, 7, 2)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0
    with torch.no_grad():
        full = model(src, attention_mask=mask, decoder_input_ids=tgt).logits  # (B, T, V)
        cache = model.new_cache(2, 7)
        steps = [model(src, attention_mask=mask, decoder_input_ids=tgt[:, :1], cache=cache).logits]
        steps += [model(decoder_input_ids=tgt[:, t:t + 1], cache=cache).logits for t in range(1, 7)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.cross_keys[0] is not None and cache.length == 7


def test_padding_on_either_side_does_not_change_the_output():
    """Relative positions only see distances, so left- and right-padded sources give the unpadded logits."""
    model = tiny_t5()
    src, tgt = ids(1, 6, 3), ids(1, 4, 4)
    pad = torch.zeros(1, 3, dtype=torch.long)
    ones, zeros = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        plain = model(src, decoder_input_ids=tgt).logits
        right = model(torch.cat([src, pad], 1), attention_mask=torch.cat([ones, zeros], 1), decoder_input_ids=tgt)
        left = model(torch.cat([pad, src], 1), attention_mask=torch.cat([zeros, ones], 1), decoder_input_ids=tgt)
    assert torch.allclose(right.logits, plain, atol=1e-5) and torch.allclose(left.logits, plain, atol=1e-5)


def test_attention_weights_path_equals_the_fused_kernel():
    model = tiny_t5()
    src, tgt = ids(2, 8, 5), ids(2, 5, 6)
    with torch.no_grad():
        fused = model(src, decoder_input_ids=tgt).logits
        explicit = model(src, decoder_input_ids=tgt, output_attentions=True)
    assert torch.allclose(explicit.logits, fused, atol=1e-5)
    assert len(explicit.attentions) == 2 and explicit.attentions[0].shape == (2, 4, 5, 5)
    assert torch.allclose(explicit.attentions[0].sum(-1), torch.ones(2, 4, 5))


def test_stacks_share_one_embedding_and_names_follow_the_convention():
    model = tiny_t5()
    assert isinstance(model.encoder, Transformer) and isinstance(model.decoder, Transformer)
    assert model.decoder.embed_tokens is model.encoder.embed_tokens
    names = dict(model.named_parameters())  # each parameter once
    assert "decoder.embed_tokens.weight" not in names and "decoder.embed_tokens.weight" in model.state_dict()
    assert {"decoder.layers.0.cross_attn.q_proj.weight", "encoder.layers.1.mlp.down_proj.weight",
            "encoder.relative_attention_bias.weight", "decoder.relative_attention_bias.weight"} <= set(names)
    assert not any(n.endswith(".bias") for n in names)  # T5 has no biases
    assert "decoder.lm_head.weight" not in names  # tied
    untied = tiny_t5(tie_embeddings=False, scale_output=False)
    assert "decoder.lm_head.weight" in dict(untied.named_parameters())
    with pytest.raises(ConfigError, match="new_model"):  # one stack cannot hold an encoder-decoder
        Transformer(model.config)


def test_shift_right_matches_transformers():
    from transformers import T5Config, T5ForConditionalGeneration

    hf = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=4,
                                             decoder_start_token_id=0))
    labels = ids(2, 6, 7)
    labels[1, 4:] = -100
    assert torch.equal(tiny_t5().shift_right(labels), hf._shift_right(labels))


def greedy_without_cache(model, src: list[int], n: int) -> list[int]:
    """Reference decoding: the whole target so far through the whole model at every step."""
    out = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([src]), decoder_input_ids=torch.tensor([out])).logits
            out.append(int(logits[0, -1].argmax()))
    return out[1:]


@pytest.mark.parametrize("method", ["none", "lora", "prefix", "prompt", "ia3"])
def test_peft_methods_decode_with_the_cache_as_without(method):
    """Every hook of the core works on both stacks: cached generation equals recomputing everything."""
    model = tiny_t5(seed=1)
    if method != "none":
        apply(model, PeftConfig(method=method, r=4, num_virtual_tokens=3))
        with torch.no_grad():  # move trainable parameters off their no-op init
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    src = ids(1, 7, 8)[0].tolist()
    got = generate_ids(model, [src], GenerationConfig(max_new_tokens=8), eos_ids=set())[0]
    assert got == greedy_without_cache(model, src, 8)


def test_lora_reaches_self_and_cross_attention_and_round_trips(tmp_path):
    model = tiny_t5(seed=2)
    src, tgt = ids(2, 6, 9), ids(2, 4, 10)
    with torch.no_grad():
        base = model(src, decoder_input_ids=tgt).logits
    config = PeftConfig(method="lora", r=4)
    apply(model, config)
    wrapped = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"encoder.layers.0.self_attn.q_proj.adapter_A", "decoder.layers.1.self_attn.v_proj.adapter_B",
            "decoder.layers.0.cross_attn.q_proj.adapter_A"} <= wrapped
    with torch.no_grad():
        assert torch.equal(model(src, decoder_input_ids=tgt).logits, base)  # B starts at zero
        for name, p in model.named_parameters():
            if name.endswith("adapter_B"):
                p.normal_(0, 0.5)
        tuned = model(src, decoder_input_ids=tgt).logits
    assert not torch.allclose(tuned, base)
    save_adapter(model, config, tmp_path / "adapter")
    fresh = tiny_t5(seed=2)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(src, decoder_input_ids=tgt).logits, tuned)
