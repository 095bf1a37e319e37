"""4-bit weight-only linear layers: faster decoding from a quarter of bf16's bytes.

Decoding one token reads every weight once for one matrix-vector product each. 4-bit weights cut the
bytes read per token, and on CPUs without native bf16 (AVX2) they also cut the work: the int4 kernel
turns codes into fp32 more cheaply than oneDNN emulates bf16. Measured on the 2-core AVX2 CPU, one
1536 x 576 product, 1 thread: bf16 230-280 us with the weights in cache and 260-365 us streaming 30
layers' weights, int4 150-175 and 160-210 us. ``Int4Linear`` holds groupwise asymmetric 4-bit codes,

    w[n, k] = scale[n, g] * code[n, k] + minimum[n, g],   g = k // group_size,  code in 0..15,

which is llama.cpp's Q4_1 exactly (Q4_0 is minimum = -8 * scale; Q4_K's sub-blocks are the same form),
so a GGUF file's blocks load without re-quantisation (``featherlm.checkpoint.gguf.load_int4_linears``).

Two ways to multiply, picked per call by the number of rows:

* few rows (decoding): PyTorch's CPU int4 kernel ``aten._weight_int4pack_mm_for_cpu``, which computes
  ``w = (code - 8) * scale + zero`` (verified numerically by ``kernel_available``; zero = minimum +
  8 * scale) from a CPU-specific packed layout, with bf16 activations and bf16 scales: measured here
  with fp32 activations it was 10-15x slower than with bf16, so scales and zeros are kept in bf16
  (the codes stay exact; scale and zero get bf16 rounding, the size of the rounding every weight gets
  in a bf16 model);
* many rows (prefill): the kernel costs about one matrix-vector product per row, so from
  ``KERNEL_MAX_ROWS`` rows on the weights are dequantised to fp32 on the fly (the same numbers the
  kernel uses) and multiplied by one fp32 GEMM; ``cache_dequantized`` keeps that fp32 copy instead
  (fast prefill, but the memory of an fp32 model).

Without the kernel (older torch, other CPUs, a failing call) every call takes the dequantised path,
with one warning. Codes are then kept in a plain layout (two per byte); with the kernel, only in the
kernel's layout, which ``_probe_layout`` learns once so the prefill path can unpack it (one copy of the
codes either way).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts
# Rows (tokens x sequences) from which a forward dequantises and runs one fp32 GEMM instead of the int4
# kernel. Measured on SmolLM2 (1 thread, busy 2-core AVX2 machine), whole-model forward, kernel vs
# dequantised: 8 rows 0.27 vs 1.13 s, 16 rows 0.54 vs 1.46 s, 32 rows 0.91 vs 1.55 s, 64 rows 1.66
# vs 1.82 s: the kernel costs about one matrix-vector product per row, dequantising a fixed ~1 s.
KERNEL_MAX_ROWS = 32

# Probed once per process: None = not probed yet; False = no usable kernel; else the packed layout
# (rows per block, and how a full block pairs rows in a byte) that ``_unpack_kernel`` reads back.
_kernel_layout: tuple[int, str] | bool | None = None
_warned = False


def _warn_fallback(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"featherlm q4: PyTorch's CPU int4 kernel is not usable ({reason}); int4 layers "
                      "multiply dequantised weights instead (correct, but decoding is slower)",
                      RuntimeWarning, stacklevel=3)


def disable_kernel(reason: str = "disabled") -> None:
    """Stop using the int4 kernel in this process (tests force the fallback this way). Layers already
    packed for the kernel keep working: their prefill path unpacks the kernel layout itself."""
    global _kernel_layout
    _kernel_layout = False
    _warn_fallback(reason)


def reset_kernel() -> None:
    """Forget the probe result (and the warning), so the next use probes the kernel again."""
    global _kernel_layout, _warned
    _kernel_layout, _warned = None, False


def kernel_available() -> bool:
    """True when the CPU int4 kernel runs, computes (code - 8) * scale + zero, and packs in a layout we
    can read back. Probed once (a few small matrices, milliseconds)."""
    global _kernel_layout
    if _kernel_layout is None:
        try:
            _kernel_layout = _probe_layout()
        except (AttributeError, RuntimeError, NotImplementedError) as e:  # missing op / unsupported CPU
            _kernel_layout = False
            _warn_fallback(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return _kernel_layout is not False


def _probe_layout() -> tuple[int, str] | bool:
    """Check the kernel's formula on a small case and find its packed layout (it depends on the CPU's
    vector width: blocks of 32 rows on AVX2, 64 on AVX-512, with 16-row tails packed pairwise)."""
    gen = torch.Generator().manual_seed(0)
    n, k, g = 48, 64, 32
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale = torch.rand(k // g, n, generator=gen) + 0.5
    zero = torch.randn(k // g, n, generator=gen)
    sz = torch.stack([scale, zero], -1).to(torch.bfloat16)  # (K/G, N, 2)
    x = torch.randn(2, k, generator=gen).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz).float()  # (2, N)
    w = (codes - 8) * sz[..., 0].float().t().repeat_interleave(g, 1) + sz[..., 1].float().t().repeat_interleave(g, 1)
    ref = x.float() @ w.t()
    if not torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
        _warn_fallback("its results do not match (code - 8) * scale + zero")
        return False
    for layout in ((32, "halves"), (64, "halves"), (32, "pairs"), (64, "pairs"), (16, "pairs")):
        if all(_round_trips(rows, layout) for rows in range(16, 160, 16)):
            return layout
    _warn_fallback("its packed weight layout is unknown to featherlm")
    return False


def _round_trips(rows: int, layout: tuple[int, str]) -> bool:
    codes = torch.randint(0, 16, (rows, 64), generator=torch.Generator().manual_seed(rows), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return torch.equal(_unpack_kernel(packed, rows, 64, layout), codes.to(torch.uint8))


def _unpack_kernel(packed: torch.Tensor, n: int, k: int, layout: tuple[int, str]) -> torch.Tensor:
    """The kernel's packed bytes -> codes (N, K) uint8. Per block of ``bn`` rows, the bytes of column k
    are contiguous; a byte holds rows (j, j + bn/2) ("halves") or (2j, 2j + 1) ("pairs"); a short last
    block is packed pairwise."""
    bn, kind = layout
    flat = packed.reshape(-1)
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    full = n // bn * bn
    if full:
        body = flat[: full * k // 2].view(n // bn, k, bn // 2)  # (blocks, K, bn/2)
        lo, hi = body & 0x0F, body >> 4
        rows = torch.cat([lo, hi], -1) if kind == "halves" else torch.stack([lo, hi], -1).flatten(2)  # (blocks, K, bn)
        out[:full] = rows.transpose(1, 2).reshape(full, k)
    if full < n:
        tail = flat[full * k // 2:].view(k, (n - full) // 2)  # (K, t/2)
        out[full:] = torch.stack([tail & 0x0F, tail >> 4], -1).flatten(1).t()
    return out


def _pack_plain(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (N, K/2) bytes, column 2i in the low nibble, 2i+1 in the high one."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_plain(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], -1).flatten(1)  # (N, K)


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights (see the module docstring); ``y = x @ w.T + bias``.

    Buffers: ``qweight`` (uint8 codes, two per byte, in the kernel's layout or a plain one),
    ``scales_and_zeros`` (K/G, N', 2) bf16 as the kernel takes them (N' = N rounded up to 16, the
    kernel's row multiple; the extra rows are zero) and ``bias`` (N) or None. The kernel layout depends
    on the CPU, so these buffers are a runtime form, not a file format: models are saved and shared
    as float or GGUF checkpoints and quantised when loaded.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        """``codes`` (N, K) integers in 0..15, ``scale`` and ``minimum`` (N, K/G): w = scale * code + minimum."""
        super().__init__()
        n, k = codes.shape
        groups = scale.shape[1]
        if scale.shape != (n, groups) or minimum.shape != scale.shape or groups == 0 or k % groups:
            raise ValueError(f"codes {tuple(codes.shape)} do not match scales {tuple(scale.shape)} "
                             f"and minimums {tuple(minimum.shape)}")
        self.in_features, self.out_features, self.group_size = k, n, k // groups
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size {self.group_size} is not one of {GROUP_SIZES}")
        self.padded = -(-n // 16) * 16  # the kernel needs a multiple of 16 rows
        pad = self.padded - n
        codes = F.pad(codes.to(torch.int32), (0, 0, 0, pad), value=8)  # padded rows: (8 - 8) * 0 + 0 = 0
        zero = F.pad(minimum.float() + 8 * scale.float(), (0, 0, 0, pad))  # fp32 sum of fp16 values: exact enough
        scale = F.pad(scale.float(), (0, 0, 0, pad))
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())
        self.layout: tuple[int, str] | None = _kernel_layout if kernel_available() else None  # None: plain
        if self.layout is not None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.cpu().contiguous(), 1)
        else:
            packed = _pack_plain(codes.to(torch.uint8))
        self.register_buffer("qweight", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.cache_dequantized = False  # True: keep the fp32 weights for prefill (fast, but fp32-sized)
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32) -> Int4Linear:
        """Quantise a float weight (N, K): per group, 16 levels from its minimum to its maximum.

        Scale and zero are rounded to bf16 first and the codes chosen against the rounded values, so
        the codes are the nearest ones to each weight under the numbers the kernel will use.
        """
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
        w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, K/G, G)
        lo, hi = w.amin(-1), w.amax(-1)  # (N, K/G)
        scale = ((hi - lo) / 15).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()  # what the kernel will hold
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((w - zero[..., None]) / safe[..., None] + 8).clamp(0, 15).to(torch.uint8)
        return cls(codes.reshape(n, k), scale, zero - 8 * scale, bias)

    def extra_repr(self) -> str:
        kind = f"kernel layout {self.layout}" if self.layout else "plain layout"
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, {kind}")

    def codes(self) -> torch.Tensor:
        """The 4-bit codes (N', K) as uint8, whatever the storage layout."""
        if self.layout is None:
            return _unpack_plain(self.qweight)
        return _unpack_kernel(self.qweight, self.padded, self.in_features, self.layout)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights (N, K) as the kernel sees them: (code - 8) * scale + zero, computed in fp32."""
        n, k, g = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros[:, :n].float()  # (K/G, N, 2)
        scale, zero = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()  # (N, K/G) each
        w = self.codes()[:n].view(n, k // g, g).to(torch.float32)  # (N, K/G, G)
        # in place: out-of-place ops broadcasting a (N, K/G, 1) operand ran ~20x slower here (measured)
        w.sub_(8).mul_(scale[..., None]).add_(zero[..., None])
        return w.view(n, k).to(dtype)

    def weight_bytes(self) -> int:
        """Bytes this layer's weights occupy (codes, scales and zeros, bias)."""
        tensors = [self.qweight, self.scales_and_zeros] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        # Decoding calls this ~200 times per token: the kernel test is kept to cheap attribute reads
        # (each extra tensor op or check here cost microseconds per call, measured).
        if (self.layout is not None and _kernel_layout and x.numel() < KERNEL_MAX_ROWS * self.in_features
                and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())):
            try:
                return self._kernel_forward(x)
            except RuntimeError as e:  # e.g. an op registered but unsupported on this CPU
                disable_kernel(f"RuntimeError: {str(e).splitlines()[0][:120]}")
        if self.cache_dequantized:
            if self._cached is None:
                self._cached = self.dequantize()
            w = self._cached
        else:
            w = self.dequantize()
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), w, bias).to(x.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        sz = self.scales_and_zeros
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.dtype != sz.dtype:
            x2 = x2.to(sz.dtype)  # the kernel takes its scales' dtype (bf16: fast; fp32 was 10-15x slower)
        y = _int4_mm(x2, self.qweight, self.group_size, sz)  # (B*T, N')
        if self.padded != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


# The output layer stays float: ``Transformer`` computes logits from ``output_weight`` (a tensor, also read
# by the perplexity evaluator's chunked loss), not by calling ``lm_head``. Measured for SmolLM2's 49152 x 576
# output matrix on the 2-core CPU: one decoding step's product 7.6 ms in bf16, 4.8 ms in int4.
KEEP_FLOAT = ("lm_head",)


def quantize_model(model: nn.Module, group_size: int = 32, *, skip: tuple[str, ...] = KEEP_FLOAT) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an ``Int4Linear`` quantised from its weights.

    ``skip``: module-name suffixes to leave in float (default: the output layer, see ``KEEP_FLOAT``).
    Layers whose input width is not a multiple of ``group_size`` stay float too. Returns the names of
    the replaced modules.
    """
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(name.endswith(s) for s in skip):
            continue
        if module.in_features % group_size:
            continue
        q = Int4Linear.from_float(module.weight, module.bias, group_size).to(module.weight.device)
        if q.bias is not None:
            q.bias = q.bias.to(module.weight.dtype)
        replace_module(model, name, q)
        done.append(name)
    return done


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted ``name`` (e.g. ``layers.0.mlp.up_proj``) to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def int4_layers(model: nn.Module) -> dict[str, Int4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (int4 codes counted packed), tied tensors once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
