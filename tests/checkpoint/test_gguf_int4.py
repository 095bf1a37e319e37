"""GGUF 4-bit blocks loaded as Int4Linear: the file's codes exactly, the same weights as dequantisation."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import featherlm
from featherlm.checkpoint import build_model, read_checkpoint
from featherlm.checkpoint.dequant import GGML, dequantize, int4_blocks
from featherlm.checkpoint.gguf import load_int4_linears, read_gguf, read_gguf_int4
from featherlm.errors import CheckpointError
from featherlm.model.quant import Int4Linear, int4_layers, weight_bytes


@pytest.mark.parametrize("qtype", [GGML.Q4_0, GGML.Q4_1])
def test_codes_scales_and_minimums_rebuild_the_dequantised_tensor(qtype):
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(x, qtype).reshape(-1))
    codes, scale, minimum = int4_blocks(raw, qtype, (6, 128))
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == minimum.shape == (6, 4)
    rebuilt = scale.repeat_interleave(32, 1) * codes + minimum.repeat_interleave(32, 1)
    assert torch.equal(rebuilt, dequantize(raw, qtype, (6, 128)))


def test_q4_k_sub_blocks_rebuild_the_dequantised_tensor():
    """Random Q4_K blocks (no Python quantiser for K-quants) with finite fp16 super-block scales."""
    rng = np.random.default_rng(1)
    block, size = gguf.GGML_QUANT_SIZES[GGML.Q4_K]
    blocks = rng.integers(0, 256, (8, size), dtype=np.uint8)
    for at in (0, 2):
        blocks[:, at:at + 2] = rng.uniform(-0.05, 0.05, (8, 1)).astype(np.float16).view(np.uint8)
    raw = torch.from_numpy(blocks.reshape(-1))
    codes, scale, minimum = int4_blocks(raw, GGML.Q4_K, (4, 512))
    rebuilt = scale.repeat_interleave(32, 1) * codes + minimum.repeat_interleave(32, 1)
    assert torch.equal(rebuilt, dequantize(raw, GGML.Q4_K, (4, 512)))


def test_other_types_have_no_codes():
    with pytest.raises(CheckpointError, match="Q8_0 has no 4-bit codes"):
        int4_blocks(torch.zeros(34, dtype=torch.uint8), GGML.Q8_0, (1, 32), name="blk.0.ffn_up.weight")
    with pytest.raises(CheckpointError, match="do not fit shape"):
        int4_blocks(torch.zeros(19, dtype=torch.uint8), GGML.Q4_1, (1, 32))


# ----- a tiny Llama GGUF with mixed tensor types ----------------------------------------------------
STORED = {"attn_q": GGML.Q4_0, "attn_k": GGML.Q4_1, "attn_v": GGML.Q4_1, "attn_output": GGML.Q4_0,
          "ffn_gate": GGML.Q4_1, "ffn_up": GGML.Q8_0, "ffn_down": GGML.Q4_1}
SHAPES = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
          "ffn_gate": (96, 64), "ffn_up": (96, 64), "ffn_down": (64, 96)}


def write_mixed(path: Path, tied: bool = True) -> Path:
    """2 layers, width 64, 4 heads (2 KV), head_dim 16; 4-bit linears except ffn_up (Q8_0)."""
    rng = np.random.default_rng(2)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
                       "attention.head_count": 4, "attention.head_count_kv": 2}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("token_embd.weight", rng.standard_normal((48, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(64)).astype(np.float32))
    if not tied:  # a 4-bit output layer (read as int4, kept float by load_int4_linears)
        w.add_tensor("output.weight", gguf.quants.quantize(rng.standard_normal((48, 64)).astype(np.float32),
                                                           GGML.Q4_1), raw_dtype=GGML.Q4_1)
    for i in range(2):
        for name, shape in SHAPES.items():
            value = (0.2 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(value, STORED[name]), raw_dtype=STORED[name])
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_file_blocks_become_int4_layers_with_the_same_weights(tmp_path):
    path = write_mixed(tmp_path / "mixed.gguf", tied=False)
    float_state = read_gguf(path).state_dict  # dequantised, q/k rows in HF order
    blocks = read_gguf_int4(path)
    assert set(blocks) == {n for n in float_state if "up_proj" not in n and "layers" in n and "norm" not in n} | {
        "lm_head.weight"}
    model = build_model(read_checkpoint(path), dtype=torch.bfloat16)
    done = load_int4_linears(model, path)
    assert len(done) == 2 * 6 and "lm_head" not in done  # the output layer stays float (see KEEP_FLOAT)
    assert not isinstance(model.layers[0].mlp.up_proj, Int4Linear)  # Q8_0 in the file: stays float
    for name, layer in int4_layers(model).items():
        hf = f"model.{name}.weight"
        assert torch.equal(layer.codes()[: layer.out_features], blocks[hf][0]), name  # the file's codes
        exact = float_state[hf]  # includes the q/k un-permutation: rows must line up
        diff = (layer.dequantize() - exact).abs().max()
        assert diff <= 2**-8 * exact.abs().max(), name  # only bf16 rounding of scale and zero


def test_load_q4_gguf_runs_close_to_float(tmp_path):
    path = write_mixed(tmp_path / "mixed.gguf")
    q4 = featherlm.load(path, dtype="q4")
    ref = featherlm.load(path, dtype="float32")
    info = q4.info()
    assert info["quantized"]["layers"] == 12 and info["quantized"]["source"].startswith("GGUF")
    assert info["parameters"] == ref.info()["parameters"]  # 4-bit weights still count as parameters
    assert info["weights_bytes"] < 0.6 * weight_bytes(featherlm.load(path, dtype="bfloat16").model)
    ids = torch.randint(0, 48, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = ref.model(ids).logits
        b = q4.model(ids).logits.float()
        c = q4.model(ids[:, :1]).logits.float()  # the kernel path
    scale = a.abs().max()
    assert (a - b).abs().max() < 3e-2 * scale and (a[:, :1] - c).abs().max() < 3e-2 * scale
