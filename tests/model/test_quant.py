"""Int4Linear: the int4 kernel path and the dequantised path give the float linear of the same weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from featherlm.generate import GenerationConfig, generate_ids
from featherlm.model import quant
from featherlm.model.quant import KERNEL_MAX_ROWS, Int4Linear, quantize_model


@pytest.fixture(autouse=True)
def fresh_kernel_state():
    """Each test probes the kernel afresh, and a forced fallback does not leak into other tests."""
    quant.reset_kernel()
    yield
    quant.reset_kernel()


def random_layer(n: int, k: int, group: int, bias: bool, seed: int = 0) -> tuple[Int4Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.1
    b = torch.randn(n, generator=gen) if bias else None
    return Int4Linear.from_float(weight, b, group), weight


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


# x is (2, rows, K): the kernel below KERNEL_MAX_ROWS rows in all, the dequantised fp32 GEMM from it on
@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS // 2 - 1, KERNEL_MAX_ROWS // 2, KERNEL_MAX_ROWS])
@pytest.mark.parametrize(("n", "k", "group", "bias"), [(64, 96, 32, False), (200, 128, 64, True), (48, 256, 128, True)])
def test_equals_the_dequantised_float_linear(rows, n, k, group, bias):
    layer, _ = random_layer(n, k, group, bias)
    w = layer.dequantize()  # (N, K) fp32: the numbers both paths multiply by
    x = torch.randn(2, rows, k)
    for dtype in (torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        ref = F.linear(xd.float(), w, layer.bias)  # exact product of the rounded activations
        y = layer(xd)
        assert y.shape == (2, rows, n) and y.dtype == dtype
        # bf16 activations or output: within bf16 rounding (2^-8 relative); fp32 GEMM: tighter
        tol = 1e-5 if dtype is torch.float32 and rows * 2 >= KERNEL_MAX_ROWS else 8e-3
        assert rel_err(y, ref) < tol, (dtype, rows)


def test_codes_are_kept_exactly_and_scales_rounded_to_bf16():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (40, 64), generator=gen, dtype=torch.uint8)  # 40 rows: padded to 48
    scale = torch.rand(40, 2, generator=gen).half().float()  # fp16 like GGUF's d and m
    minimum = -(torch.rand(40, 2, generator=gen) * 8).half().float()
    layer = Int4Linear(codes, scale, minimum)
    assert torch.equal(layer.codes()[:40], codes)
    s = scale.bfloat16().float().repeat_interleave(32, 1)
    z = (minimum + 8 * scale).bfloat16().float().repeat_interleave(32, 1)
    assert torch.equal(layer.dequantize(), (codes.float() - 8) * s + z)
    exact = scale.repeat_interleave(32, 1) * codes + minimum.repeat_interleave(32, 1)
    assert (layer.dequantize() - exact).abs().max() <= 2**-8 * exact.abs().max()  # bf16-sized, no more


def test_from_float_error_is_at_most_half_a_step():
    layer, w = random_layer(64, 128, 32, bias=False, seed=2)
    groups = w.reshape(64, 4, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, 1)  # (N, K)
    err = (layer.dequantize() - w).abs()
    assert (err <= 0.5 * step * 1.02 + 1e-6).all()  # 2% slack: scale and zero are bf16
    assert err.max() > 0.1 * step.max()  # it did quantise


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group size 16"):
        Int4Linear(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 4), torch.zeros(16, 4))
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        Int4Linear.from_float(torch.randn(16, 40))


def test_kernel_is_probed_and_used_here():
    """On this machine's torch (2.13 CPU) the kernel exists: decoding must use it, not the fallback."""
    assert quant.kernel_available()
    layer, _ = random_layer(64, 96, 32, bias=False)
    assert layer.layout is not None
    calls = []
    original = layer._kernel_forward
    layer._kernel_forward = lambda x: calls.append(x.shape) or original(x)
    layer(torch.randn(1, 1, 96).bfloat16())
    layer(torch.randn(1, 2 * KERNEL_MAX_ROWS, 96).bfloat16())  # prefill: dequantised GEMM
    assert calls == [(1, 1, 96)]


def test_fallback_without_kernel_warns_once_and_gives_the_same_numbers():
    kernel_layer, _ = random_layer(64, 96, 32, bias=True)
    x = torch.randn(1, 1, 96).bfloat16()
    expected = kernel_layer(x)
    with pytest.warns(RuntimeWarning, match="int4 kernel is not usable"):
        quant.disable_kernel("forced by the test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        plain, _ = random_layer(64, 96, 32, bias=True)
        assert plain.layout is None  # codes in the plain layout: no kernel to pack for
        assert torch.equal(plain.codes(), kernel_layer.codes())
        for layer in (plain, kernel_layer):  # a layer packed for the kernel still works without it
            assert rel_err(layer(x), expected.float()) < 8e-3


def test_missing_kernel_op_falls_back(monkeypatch):
    def missing():
        raise AttributeError("'_OpNamespace' 'aten' object has no attribute '_weight_int4pack_mm_for_cpu'")

    monkeypatch.setattr(quant, "_probe_layout", missing)
    with pytest.warns(RuntimeWarning, match="AttributeError"):
        assert not quant.kernel_available()
    layer, _ = random_layer(32, 64, 32, bias=False)
    x = torch.randn(1, 64)
    assert layer.layout is None
    assert rel_err(layer(x), F.linear(x, layer.dequantize())) < 1e-6


def test_failing_kernel_call_falls_back_once(monkeypatch):
    layer, _ = random_layer(64, 96, 32, bias=False)

    def broken(x):
        raise RuntimeError("_weight_int4pack_mm_cpu: not supported on this CPU")

    monkeypatch.setattr(layer, "_kernel_forward", broken)
    x = torch.randn(1, 96).bfloat16()
    with pytest.warns(RuntimeWarning, match="not supported on this CPU"):
        y = layer(x)
    assert rel_err(y, F.linear(x.float(), layer.dequantize())) < 8e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # the kernel is off now: no second attempt, no second warning


def test_gradients_flow_to_the_input():
    layer, _ = random_layer(32, 64, 32, bias=False)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantize().sum(0), atol=1e-5)


def test_cached_dequantized_weights_give_the_same_output():
    layer, _ = random_layer(64, 96, 32, bias=True)
    x = torch.randn(2 * KERNEL_MAX_ROWS, 96)  # prefill-sized: the dequantised path
    y = layer(x)
    layer.cache_dequantized = True
    assert torch.equal(layer(x), y) and layer._cached is not None


def dequantized_copy(model):
    """The same model with each Int4Linear back as an fp32 nn.Linear of its dequantised weights."""
    out = copy.deepcopy(model).float()
    for name, layer in quant.int4_layers(out).items():
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data = layer.dequantize()
        if layer.bias is not None:
            linear.bias.data = layer.bias.float()
        quant.replace_module(out, name, linear)
    return out


def test_quantize_model_equals_its_dequantised_weights_and_generates(tiny_model):
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        original = model(ids).logits.float()
    done = quantize_model(model, group_size=32)
    assert len(done) == 2 * 7 and "lm_head" not in done  # the output layer stays float by default
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear) and not isinstance(model.lm_head, Int4Linear)
    reference = dequantized_copy(model)
    with torch.inference_mode():
        ref = reference(ids).logits
        got = model(ids).logits.float()  # 12 rows per sequence: the dequantised path
        step = model(ids[:, :1]).logits.float()  # 1 row per sequence: the kernel path
    assert rel_err(got, ref) < 3e-2  # same weights; bf16 activations between layers
    assert rel_err(step, ref[:, :1]) < 3e-2
    similarity = F.cosine_similarity(got.flatten(), original.flatten(), dim=0)
    assert similarity > 0.9  # and near the unquantised model (4 bits: close, not equal)
    out = generate_ids(model, [ids[0].tolist()], GenerationConfig(max_new_tokens=5), eos_ids=set())
    assert len(out[0]) == 5


def test_weight_bytes_count_packed_codes(tiny_model):
    model = tiny_model("llama").to(torch.bfloat16)
    before = quant.weight_bytes(model)
    quantize_model(model)
    linears = sum(m.in_features * m.out_features for m in quant.int4_layers(model).values())
    assert before - quant.weight_bytes(model) > linears * (2 - 0.5 - 0.25)  # bf16 -> 4 bits + bf16 scale/zero


def test_load_q4_quantises_a_float_checkpoint(hf_llama):  # (folder, HF model)
    """``featherlm.load(folder, dtype="q4")`` on an HF folder: linears quantised in groups of 32 (where the
    width allows), the output layer and the embeddings stay bf16, and it still generates."""
    import featherlm

    lm = featherlm.load(hf_llama[0], dtype="q4")
    layers = quant.int4_layers(lm.model)
    assert layers and all(layer.group_size == 32 for layer in layers.values())
    assert not isinstance(lm.model.lm_head, Int4Linear) and lm.model.lm_head.weight.dtype == torch.bfloat16
    info = lm.info()
    assert info["quantized"]["layers"] == len(layers) and info["quantized"]["source"].startswith("quantised from")
    ref = featherlm.load(hf_llama[0])
    assert info["parameters"] == ref.info()["parameters"]
    out = generate_ids(lm.model, [[1, 2, 3]], GenerationConfig(max_new_tokens=4), eos_ids=set())
    assert len(out[0]) == 4
