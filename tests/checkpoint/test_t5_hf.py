"""T5 from Hugging Face folders: parity with transformers' T5ForConditionalGeneration on tiny random
models (t5, t5 v1.1 / flan-t5, tied and untied), greedy and beam generation, export and own folders.

Each variant is a random T5ForConditionalGeneration saved with save_pretrained. transformers 5 writes
every T5 config as tied; an untied model (flan-t5, t5 v1.1) is one whose file holds an ``lm_head``
that differs from ``shared``, so the untied fixture adds one, as those checkpoints have, and the
reference is transformers' own reading of that folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from featherlm.checkpoint import build_model, export_hf, read_checkpoint, save_model
from featherlm.errors import CheckpointError
from featherlm.generate import GenerationConfig, beam_search, generate_ids

TOL = 1e-4
VOCAB = 97
EOS = 1
# name -> (feed_forward_proj, tied in the file, decoder layers, extra config)
VARIANTS = {
    "t5": ("relu", True, 2, {}),  # the original T5: ReLU MLP, tied and rescaled output
    "t5-v1.1": ("gated-gelu", False, 2, {}),  # T5 v1.1 / flan-t5: gated-GELU, separate lm_head, no rescaling
    # transformers 5's reading of tie_word_embeddings=False: tied but not rescaled; 3 decoder blocks
    "gated-silu-unscaled": ("gated-silu", True, 3, {"tie_word_embeddings": False}),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise well above the init scale: a wrong name or a missing rescale changes the logits a lot."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "layer_norm" in name else 0.4 * noise)


def _make(root, name: str, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    proj, tied, n_dec, extra = VARIANTS[name]
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=n_dec,
                      num_heads=4, feed_forward_proj=proj, relative_attention_num_buckets=8,
                      relative_attention_max_distance=20, decoder_start_token_id=0, **extra)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    _randomize(model, seed)
    folder = root / name
    model.save_pretrained(folder)
    if not tied:  # a distinct output layer in the file and the config, as flan-t5's files have
        state = load_file(folder / "model.safetensors")
        state["lm_head.weight"] = 0.4 * torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(seed + 1))
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        data = json.loads((folder / "config.json").read_text())
        data.update(tie_word_embeddings=False, scale_decoder_outputs=False)
        (folder / "config.json").write_text(json.dumps(data))
    return folder, T5ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    """Factory: ``hf_t5(name)`` -> (folder, transformers model) for a name of VARIANTS (built once)."""
    root, made = tmp_path_factory.mktemp("hf_t5"), {}

    def get(name: str):
        if name not in made:
            made[name] = _make(root, name, seed=len(made) + 3)
        return made[name]

    return get


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three sources of 30, 21 and 12 tokens (right padded, as T5 tokenizers pad) and their mask."""
    ids = torch.randint(2, VOCAB, (3, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0
    mask[2, 12:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(hf_t5, name):
    folder, hf = hf_t5(name)
    ckpt = read_checkpoint(folder)
    proj, tied, n_dec, extra = VARIANTS[name]
    assert ckpt.config.tie_embeddings == tied and ckpt.config.n_decoder_layer == n_dec
    assert ckpt.config.scale_output == hf.config.scale_decoder_outputs
    model = build_model(ckpt)
    ids, mask = source_batch()
    targets = torch.randint(2, VOCAB, (3, 25), generator=torch.Generator().manual_seed(1))
    target_mask = torch.ones_like(targets)
    target_mask[2, 9:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=targets,
                      decoder_attention_mask=target_mask).logits
        got = model(ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=target_mask).logits
    assert expected.abs().max() > 1.0
    real = target_mask.bool()
    assert (got[real] - expected[real]).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["t5", "t5-v1.1"])
def test_greedy_generation_matches_transformers(hf_t5, name):
    """A batch of sources of different lengths: featherlm left-pads them, transformers right-pads."""
    folder, hf = hf_t5(name)
    model = build_model(read_checkpoint(folder))
    ids, mask = source_batch()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    got = generate_ids(model, prompts, GenerationConfig(max_new_tokens=24), eos_ids={EOS}, pad_id=0)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, num_beams=1)
    for row, out in zip(expected.tolist(), got, strict=True):
        row = row[1:]  # transformers returns the start token first
        row = row[: row.index(EOS)] if EOS in row else row  # and pads rows that ended
        assert out == row
    assert len({tuple(o) for o in got}) == 3 and any(len(set(o)) > 3 for o in got)  # outputs vary


def test_beam_search_matches_transformers(hf_t5):
    folder, hf = hf_t5("t5-v1.1")
    model = build_model(read_checkpoint(folder))
    ids, _ = source_batch()
    got = beam_search(model, ids[0].tolist(), GenerationConfig(max_new_tokens=20, num_beams=3), eos_ids={EOS})
    with torch.no_grad():
        expected = hf.generate(input_ids=ids[:1], max_new_tokens=20, do_sample=False, num_beams=3)[0, 1:].tolist()
    assert got == (expected[: expected.index(EOS)] if EOS in expected else expected)


@pytest.mark.parametrize("name", ["t5", "t5-v1.1"])
def test_export_round_trip_loads_in_transformers(hf_t5, name, tmp_path):
    from transformers import T5ForConditionalGeneration

    folder, _ = hf_t5(name)
    model = build_model(read_checkpoint(folder))
    out = export_hf(model, None, tmp_path / "export")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "shared.weight" in keys and "decoder.embed_tokens.weight" not in keys
    assert ("lm_head.weight" in keys) == (not model.config.tie_embeddings)
    reloaded = T5ForConditionalGeneration.from_pretrained(out).eval()
    ids, mask = source_batch()
    targets = torch.randint(2, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, decoder_input_ids=targets).logits
        theirs = reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=targets).logits
    assert (ours - theirs).abs().max().item() < TOL
    assert read_checkpoint(out).config == model.config  # and featherlm reads its export back as it was


def test_own_folder_stores_the_shared_table_once(hf_t5, tmp_path):
    folder, _ = hf_t5("t5")
    model = build_model(read_checkpoint(folder))
    out = save_model(model, None, tmp_path / "own")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "encoder.embed_tokens.weight" in keys and "decoder.embed_tokens.weight" not in keys
    again = build_model(read_checkpoint(out))
    assert again.decoder.embed_tokens is again.encoder.embed_tokens  # still one table after loading
    ids, mask = source_batch()
    start = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask, decoder_input_ids=start).logits,
                           model(ids, attention_mask=mask, decoder_input_ids=start).logits)


def test_bad_t5_folders_are_one_line_errors(hf_t5, tmp_path):
    folder, _ = hf_t5("t5")
    bad = tmp_path / "bad"
    bad.mkdir()
    data = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**data, "feed_forward_proj": "gated-gelu-relu"}))
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        read_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps(data))
    state = load_file(folder / "model.safetensors")
    del state["decoder.block.1.layer.1.EncDecAttention.k.weight"]
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match"):
        build_model(read_checkpoint(bad))
