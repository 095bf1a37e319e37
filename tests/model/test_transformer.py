"""The one Transformer on tiny random configs of every family: shapes, KV cache, padding, attention maps."""

from __future__ import annotations

import math

import pytest
import torch

FAMILIES = ["llama", "gpt2", "bert"]
DECODERS = ["llama", "gpt2"]
TOL = 1e-5


def ids_of(batch: int, length: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() < tol


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("family", FAMILIES)
def test_output_shapes(family, tiny_model):
    model = tiny_model(family)
    cfg = model.config
    out = model(ids_of(3, 7))
    assert out.hidden.shape == (3, 7, cfg.d_model)
    assert out.attentions is None
    if family == "bert":
        assert out.logits is None and out.pooled.shape == (3, cfg.d_model)
    else:
        assert out.logits.shape == (3, 7, cfg.vocab_size) and out.pooled is None
    assert torch.isfinite(out.hidden).all()


def test_gqa_shares_each_kv_head_with_its_group(tiny_model):
    """A GQA model equals the multi-head model whose k/v heads are the GQA heads, each repeated."""
    gqa = tiny_model("llama", n_head=4, n_kv_head=2)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (2 * gqa.config.head_dim, gqa.config.d_model)
    mha = tiny_model("llama", n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    d = gqa.config.head_dim
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = state[name].view(2, d, -1)  # kv head j serves query heads 2j and 2j+1
            state[name] = heads.repeat_interleave(2, dim=0).reshape(4 * d, -1)
    mha.load_state_dict(state)
    ids = ids_of(2, 9)
    assert close(gqa(ids).logits, mha(ids).logits)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_is_causal_and_encoder_is_not(family, tiny_model):
    ids = ids_of(1, 8)
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 97
    model = tiny_model(family)
    assert close(model(ids).logits[:, :5], model(changed).logits[:, :5])
    assert not close(model(ids).logits[:, 5:], model(changed).logits[:, 5:], 1e-3)
    bert = tiny_model("bert")
    assert not close(bert(ids).hidden[:, :5], bert(changed).hidden[:, :5], 1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-sinusoidal"])
def test_kv_cache_matches_full_forward(family, tiny_model):
    """Prefill 4 tokens, then 1 at a time, then a chunk of 3 onto the cache, then 1 more."""
    model = tiny_model("llama", position="sinusoidal") if family == "llama-sinusoidal" else tiny_model(family)
    ids = ids_of(2, 12)
    full = model(ids).logits
    cache = model.new_cache(2, 16)
    pieces, start = [], 0
    for size in (4, 1, 1, 1, 3, 1, 1):
        pieces.append(model(ids[:, start:start + size], cache=cache).logits)
        start += size
        assert cache.length == start
    assert close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_left_padded_batch_matches_full_forward(family, tiny_model):
    model = tiny_model(family)
    prompts = [ids_of(1, 6, seed=1)[0], ids_of(1, 3, seed=2)[0], ids_of(1, 1, seed=3)[0]]
    ids, mask = left_padded(prompts)
    new = ids_of(3, 5, seed=4)
    all_ids = torch.cat([ids, new], dim=1)
    all_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    full = model(all_ids, attention_mask=all_mask).logits
    cache = model.new_cache(3, all_ids.shape[1])
    pieces, start = [], 0
    for size in (ids.shape[1], 1, 2, 1, 1):  # prompt, single tokens and a chunk, with a growing mask
        end = start + size
        pieces.append(model(all_ids[:, start:end], attention_mask=all_mask[:, :end], cache=cache).logits)
        start = end
    real = all_mask.bool()
    assert close(torch.cat(pieces, dim=1)[real], full[real])


@pytest.mark.parametrize("family", DECODERS + ["llama-sinusoidal"])
def test_left_padded_row_equals_unpadded_prompt(family, tiny_model):
    model = tiny_model("llama", position="sinusoidal") if family == "llama-sinusoidal" else tiny_model(family)
    prompts = [ids_of(1, 7, seed=1)[0], ids_of(1, 3, seed=2)[0]]
    ids, mask = left_padded(prompts)
    batch = model(ids, attention_mask=mask).logits
    for row, prompt in enumerate(prompts):
        alone = model(prompt[None]).logits[0]
        assert close(batch[row, mask[row].bool()], alone)


def test_bert_right_padded_row_equals_unpadded(tiny_model):
    model = tiny_model("bert")
    ids = ids_of(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch = model(ids, attention_mask=mask)
    alone = model(ids[1:, :5])
    assert close(batch.hidden[1, :5], alone.hidden[0])
    assert close(batch.pooled[1], alone.pooled[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights(family, tiny_model):
    model = tiny_model(family)
    ids = ids_of(2, 6)
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, 4:] = 0  # right padding
    else:
        mask[1, :2] = 0  # left padding
    sdpa = model(ids, attention_mask=mask)
    explicit = model(ids, attention_mask=mask, output_attentions=True)
    assert close(explicit.hidden, sdpa.hidden)
    assert len(explicit.attentions) == model.config.n_layer
    T = ids.shape[1]
    for w in explicit.attentions:
        assert w.shape == (2, model.config.n_head, T, T)
        assert close(w.sum(-1), torch.ones(2, model.config.n_head, T))
        if family != "bert":
            assert (w.triu(1) == 0).all()  # no weight on future keys
            assert (w[1, :, 2:, :2] == 0).all()  # real queries put no weight on the padding
        else:
            assert (w[1, :, :, 4:] == 0).all()
            assert (w[0] > 0).all()  # bidirectional: every key is seen


@pytest.mark.parametrize("family", DECODERS)
def test_attention_weights_with_cache_match_sdpa(family, tiny_model):
    model = tiny_model(family)
    ids = ids_of(1, 7)
    plain, explicit = model.new_cache(1), model.new_cache(1)
    for sl in (slice(0, 4), slice(4, 7)):  # the second chunk attends to the cache with a causal mask
        a = model(ids[:, sl], cache=plain)
        b = model(ids[:, sl], cache=explicit, output_attentions=True)
        assert close(a.logits, b.logits)
    w = b.attentions[0][0]  # (H, 3, 7)
    assert w.shape[-2:] == (3, 7)
    assert (w[:, 0, 5:] == 0).all() and (w[:, 1, 6:] == 0).all() and (w[:, 2] > 0).all()


@pytest.mark.parametrize("family", DECODERS)
def test_last_only(family, tiny_model):
    model = tiny_model(family)
    ids = ids_of(2, 5)
    last = model(ids, last_only=True)
    full = model(ids)
    assert last.logits.shape == (2, 1, model.config.vocab_size)
    assert close(last.logits, full.logits[:, -1:])
    assert last.hidden.shape == full.hidden.shape


def test_sinusoidal_table_and_positions(tiny_model):
    model = tiny_model("llama", position="sinusoidal")
    table, d = model.sinusoid, model.config.d_model
    for pos, i in [(0, 0), (3, 0), (5, 4), (17, 14)]:
        angle = pos / 10000 ** (i / d)
        assert math.isclose(table[pos, i].item(), math.sin(angle), abs_tol=1e-5)
        assert math.isclose(table[pos, i + 1].item(), math.cos(angle), abs_tol=1e-5)
    assert "sinusoid" not in model.state_dict()  # fixed, not a weight
    ids = ids_of(1, 6)
    shifted = torch.arange(6)[None] + 10
    assert not close(model(ids).logits, model(ids, position_ids=shifted).logits, 1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_overflow_raises(family, tiny_model):
    model = tiny_model(family, max_seq_len=8)
    model(ids_of(1, 8))  # exactly the context is fine
    with pytest.raises(ValueError, match="context"):
        model(ids_of(1, 9))
    if family != "bert":
        cache = model.new_cache(1)
        model(ids_of(1, 6), cache=cache)
        with pytest.raises(ValueError, match="context"):
            model(ids_of(1, 3), cache=cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_forward_is_close_to_fp32(family, tiny_model):
    model = tiny_model(family)
    ids = ids_of(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = model(ids, attention_mask=mask)
    half = model.to(torch.bfloat16)(ids, attention_mask=mask)
    a, b = (ref.hidden, half.hidden) if family == "bert" else (ref.logits, half.logits)
    assert b.dtype == torch.bfloat16
    scale = a.abs().max().item()
    error = (a - b.float()).abs().max().item()
    assert error < 0.05 * scale, (error, scale)


@pytest.mark.parametrize("family", DECODERS)
def test_bf16_kv_cache_decoding_is_close_to_fp32(family, tiny_model):
    model = tiny_model(family)
    ids = ids_of(2, 9)
    ref = model(ids).logits
    model = model.to(torch.bfloat16)
    cache = model.new_cache(2)
    steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                        for t in range(5, 9)]
    got = torch.cat(steps, dim=1).float()
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
