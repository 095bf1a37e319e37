"""Dequantisation of GGML tensor types into float32 torch tensors.

Whole-tensor torch ops for the common types (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K): about
0.8 s for SmolLM2-135M Q4_1 against ~1.7 s for ``gguf.quants.dequantize``, which works on numpy in
groups of rows. Rarer types fall back to ``gguf.quants``; the tests check both give identical numbers.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import torch

from featherlm.errors import CheckpointError

GGML = gguf.GGMLQuantizationType


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], *, name: str = "tensor"
               ) -> torch.Tensor:
    """Decode a tensor's bytes (uint8, 1-D) of the given GGML type into a float32 tensor of ``shape``."""
    try:
        qtype = GGML(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise CheckpointError(name, f"unknown GGML tensor type {ggml_type}") from None
    n = math.prod(shape)
    if n % block or raw.numel() != n // block * type_size:
        raise CheckpointError(name, f"{raw.numel()} bytes of {qtype.name} do not fit shape {list(shape)}")
    blocks = raw.reshape(-1, type_size)  # (n_blocks, bytes per block)
    if qtype in _DEQUANT:
        out = _DEQUANT[qtype](blocks)
    else:
        try:
            values = gguf.quants.dequantize(blocks.numpy(), qtype)
            out = torch.from_numpy(np.ascontiguousarray(values, np.float32))
        except NotImplementedError:
            raise CheckpointError(name, f"tensor type {qtype.name} is not supported") from None
    return out.reshape(shape)


INT4_TYPES = (GGML.Q4_0, GGML.Q4_1, GGML.Q4_K)  # 4-bit codes in groups of 32: w = scale * code + minimum


def int4_blocks(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int], *, name: str = "tensor"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode a Q4_0 / Q4_1 / Q4_K matrix (N, K) into its 4-bit codes without dequantising them.

    Returns ``codes`` (N, K) uint8 in 0..15 and ``scale``, ``minimum`` (N, K/32) float32 such that
    ``scale * codes + minimum`` (per group of 32 along K) is exactly what ``dequantize`` gives: Q4_1
    is (d, m), Q4_0 is (d, -8d), and Q4_K's sub-blocks are (d * sc, -dmin * mn), products of an fp16
    and a 6-bit integer, exact in float32.
    """
    qtype = GGML(ggml_type)
    if qtype not in INT4_TYPES:
        raise CheckpointError(name, f"tensor type {qtype.name} has no 4-bit codes (expected Q4_0, Q4_1 or Q4_K)")
    n, k = shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if k % block or raw.numel() != n * k // block * type_size:
        raise CheckpointError(name, f"{raw.numel()} bytes of {qtype.name} do not fit shape {list(shape)}")
    b = raw.reshape(-1, type_size)  # (n_blocks, bytes per block)
    if qtype == GGML.Q4_K:
        scale, minimum = _q4_k_scales(b)  # (n_blocks, 8) each
        codes = _nibbles(b[:, 16:].reshape(-1, 4, 32))  # (n_blocks, 4, 64): 2 sub-blocks of 32 per row
        minimum = -minimum
    else:
        codes = _nibbles(b[:, 4 if qtype == GGML.Q4_1 else 2:])  # (n_blocks, 32)
        scale = _f16(b, 0)  # (n_blocks, 1)
        minimum = _f16(b, 2) if qtype == GGML.Q4_1 else -8 * scale
    return codes.reshape(n, k), scale.reshape(n, k // 32), minimum.reshape(n, k // 32)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Half-precision scale stored at byte ``start`` of each block -> (n_blocks, 1) float32."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k): all low nibbles first, then all high nibbles (GGML's order)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # 32 x int8 * scale
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # 32 x (4-bit - 8) * scale
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # 32 x 4-bit * scale + min
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q4_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's per-sub-block scale d * sc and min dmin * mn: (n, 8) each; 6-bit sc, mn packed in 12 bytes."""
    n = b.shape[0]
    s = b[:, 4:16].reshape(n, 3, 4)
    lo, hi, mix = s[:, 0], s[:, 1], s[:, 2]  # (n, 4) each
    scale = torch.cat([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], dim=1).float()  # (n, 8)
    mins = torch.cat([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], dim=1).float()
    return _f16(b, 0) * scale, _f16(b, 2) * mins


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """256 values in 8 sub-blocks of 32, each with a 6-bit scale and min packed into 12 bytes."""
    n = b.shape[0]
    d, dm = _q4_k_scales(b)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()  # 32 bytes -> 2 sub-blocks
    return (d.reshape(n, 8, 1) * q - dm.reshape(n, 8, 1)).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """256 signed 6-bit values: low 4 bits in ``ql``, high 2 bits in ``qh``, 16 int8 scales."""
    n = b.shape[0]
    ql = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)  # 2 bits x 4 per byte
    q = ((ql | (qh << 4)).float() - 32).reshape(n, 16, 16)
    d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    return (d * q).reshape(n, 256)


_DEQUANT = {
    GGML.F32: lambda b: b.contiguous().view(torch.float32),
    GGML.F16: lambda b: b.contiguous().view(torch.float16).float(),
    GGML.BF16: lambda b: b.contiguous().view(torch.bfloat16).float(),
    GGML.Q8_0: _q8_0, GGML.Q4_0: _q4_0, GGML.Q4_1: _q4_1, GGML.Q4_K: _q4_k, GGML.Q6_K: _q6_k,
}
