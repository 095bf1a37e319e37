"""Building blocks shared by every family: norms, positions, attention, MLP, the transformer block.

Shapes: B batch, T new tokens, S attended positions (cache + new), H query heads, Hkv key/value
heads, D head size, C model width.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.config import ModelConfig


def _cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere (AVX2 machines)
    oneDNN emulates bf16 GEMM, several times slower than fp32 once more than a few rows are multiplied."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


NATIVE_BF16 = _cpu_has_native_bf16()
UPCAST_MIN_ROWS = 8  # measured crossover on an AVX2 CPU: below it bf16 reads fewer bytes and wins


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except bf16 inputs of many rows on a CPU without native bf16 are multiplied in fp32.

    Weights stay bf16 in memory (half the bytes: decoding one token is bandwidth bound), while a
    prompt's prefill, which is compute bound, does not pay for emulated bf16 arithmetic.
    """
    if (x.dtype is torch.bfloat16 and not NATIVE_BF16 and x.device.type == "cpu"
            and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]):
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear with featherlm's CPU bf16 dispatch (see ``linear``); same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama). Computed in fp32 so bf16 weights keep HF's numerics."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in one call; computed in fp32 for bf16 inputs
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact erf GELU (BERT)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
}


# ----------------------------------------------------------------------------- positions


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, with Llama 3 style long-context scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple:
    """cos and signed sin tables for the given positions: each (B, 1, T, D), broadcast over heads.

    HF's "rotate_half" layout pairs dims (i, i + D/2). The sign of rotate_half's first half is folded
    into the sin table once per forward, so every layer rotates with one roll instead of cat + neg.
    """
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    cos = torch.cat((freqs, freqs), dim=-1).cos()  # (B, T, D)
    sin = freqs.sin()
    signed_sin = torch.cat((-sin, sin), dim=-1)
    return cos[:, None].to(dtype), signed_sin[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by the position angle:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * sign."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need": (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table


def relative_buckets(distance: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance (any shape, long) -> same shape, in 0..num_buckets-1.

    Half the buckets hold exact small distances, the other half logarithmically wider ranges up to
    ``max_distance`` (farther ones share the last bucket): nearby order matters more than far order.
    An encoder (bidirectional) spends half its buckets on keys after the query; a decoder sees only
    keys before it, so every bucket describes the past.
    """
    bucket = torch.zeros_like(distance)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (distance > 0).long() * num_buckets  # keys after the query: the upper half
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)  # how far in the past; future keys are masked anyway
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values for every layer: (B, Hkv, max_len, D) each.

    Static buffers avoid a torch.cat per token (the usual dynamic cache cost); ``length`` counts the
    filled positions and advances once per forward, after the last layer wrote. On CPU the cache is
    kept in fp32 even for bf16 weights: CPU attention kernels are several times slower in bf16 for
    one query token, and the cache is small next to the weights.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0
        # Decoders with cross-attention: the encoder output's keys and values per layer (B, Hkv, S_enc, D),
        # computed on the first forward and reused by every decoding step, and the encoder's padding.
        self.cross_keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.cross_values: list[torch.Tensor | None] = [None] * config.n_layer
        self.cross_mask: torch.Tensor | None = None  # bool (B, 1, 1, S_enc); None: no padding

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k, v (B, Hkv, T, D) at the current length; return all filled positions."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} needed")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.cross_keys = [None if k is None else k.index_select(0, index) for k in self.cross_keys]
        self.cross_values = [None if v is None else v.index_select(0, index) for v in self.cross_values]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, index)


# ----------------------------------------------------------------------------- padding


class Unpadded:
    """The real tokens of a padded batch, kept as one block of N rows instead of (B, T) positions.

    Everything in a block but attention works token by token (projections, LoRA, norms, MLP), so a
    padded batch runs those on its N real rows only; attention alone scatters its queries, keys and
    values back to (B, T, .) with zeros at the padding (which the mask hides from every real query)
    and gathers its output rows again. The real positions get what the padded computation gives them.
    """

    def __init__(self, attention_mask: torch.Tensor) -> None:  # (B, T) 1 = real token
        self.batch, self.length = attention_mask.shape
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened (B*T)
        self.rows, self.cols = self.index // self.length, self.index % self.length  # (N,) each

    def pad(self, x: torch.Tensor) -> torch.Tensor:  # (N, F) -> (B, T, F), zeros at padding
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        return out.index_copy_(0, self.index, x).view(self.batch, self.length, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (N, ...), any strides
        return x[self.rows, self.cols]


# ----------------------------------------------------------------------------- attention and MLP


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention with separate q/k/v projections.

    ``cross``: keys and values come from another sequence (the encoder's output, ``memory``), with
    no positions and no causality; with a cache they are computed once and kept there.
    ``mask`` is boolean (True = may attend) or a float bias added to the scores (T5's relative
    position bias with padding and causality folded in as large negative values).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, cross: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cross = cross
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        c, d = config.d_model, config.head_dim
        self.q_proj = Linear(c, self.n_head * d, bias=config.attn_bias)
        self.k_proj = Linear(c, self.n_kv_head * d, bias=config.attn_bias)
        self.v_proj = Linear(c, self.n_kv_head * d, bias=config.attn_bias)
        self.o_proj = Linear(self.n_head * d, c, bias=config.o_bias)
        self.use_rope = config.position == "rope" and not cross
        self.causal = config.causal and not cross
        self.scale = None if config.attn_scale else 1.0  # None: SDPA's 1/sqrt(D)
        # Hook for prompt-style PEFT (prefix tuning): a module called as kv_prefix(B) -> (k, v), each
        # (B, Hkv, P, D): extra keys/values that every query may attend to. They carry no position
        # (no RoPE) and are never written to the KV cache, so generation with a cache still works.
        self.kv_prefix: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C), or (N, C) with unpadded
        mask: torch.Tensor | None,  # bool (B, 1, T, S) True = may attend, or float bias (B|1, H|1, T, S); None = plain
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        need_weights: bool = False,
        memory: torch.Tensor | None = None,  # (B, S, C) cross-attention: what the keys and values come from
        unpadded: Unpadded | None = None,  # x is (N, C), the real tokens only (see Unpadded)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        B, T = x.shape[:2] if unpadded is None else (unpadded.batch, unpadded.length)

        def project(proj: nn.Module) -> torch.Tensor:  # (B, T, F); unpadded: N rows projected, then placed
            return proj(x) if unpadded is None else unpadded.pad(proj(x))

        q = project(self.q_proj).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if self.cross:
            k, v = self.memory_kv(memory, cache)  # (B, Hkv, S, D)
        else:
            k = project(self.k_proj).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = project(self.v_proj).view(B, T, Hkv, D).transpose(1, 2)
            if self.use_rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D)
        q = q.to(k.dtype)  # the cache may be fp32 under bf16 weights (see KVCache)
        if self.kv_prefix is not None:
            k_pre, v_pre = self.kv_prefix(B)  # (B, Hkv, P, D) each
            P, S = k_pre.shape[2], k.shape[2]
            k, v = torch.cat([k_pre.to(k.dtype), k], dim=2), torch.cat([v_pre.to(v.dtype), v], dim=2)
            if mask is None and self.causal and T > 1:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
            if mask is not None:  # every query may attend to the P prefix positions (no position bias)
                pad = mask.new_zeros if mask.is_floating_point() else mask.new_ones
                mask = torch.cat([pad(*mask.shape[:-1], P), mask], dim=-1)  # (B|1, 1|H, T|1, P+S)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        gqa = self.n_kv_head != self.n_head  # grouped-query attention: each k/v head serves a group
        weights = None
        if need_weights:  # explicit softmax so the attention map can be returned
            if gqa:
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, S, D)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            scale = self.scale if self.scale is not None else 1 / math.sqrt(self.head_dim)
            scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
            if mask is None and self.causal and T > 1:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            if mask is not None:
                scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
            weights = scores.float().softmax(-1).to(q.dtype)
            y = weights @ v
        else:
            is_causal = mask is None and self.causal and T > 1 and k.shape[2] == T
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa,
                                               scale=self.scale)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if unpadded is not None:
            y = unpadded.unpad(y)  # (N, H, D): the real queries' rows
        y = y.reshape(*y.shape[:-2], H * D).to(x.dtype)  # (B, T, H*D) or (N, H*D)
        return self.o_proj(y), weights

    def memory_kv(self, memory: torch.Tensor | None, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, Hkv, S, D) of ``memory``; with a cache, computed on the
        first call of a sequence and reused by the decoding steps (which pass no memory)."""
        i = self.layer_idx
        if memory is None:
            if cache is None or cache.cross_keys[i] is None:
                raise ValueError("cross-attention needs the encoder output (memory) or a cache that holds it")
            return cache.cross_keys[i], cache.cross_values[i]
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(memory).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            dtype = cache.keys[i].dtype
            k, v = k.to(dtype), v.to(dtype)
            cache.cross_keys[i], cache.cross_values[i] = k, v
        return k, v


class MLP(nn.Module):
    """Feed-forward: gated (SwiGLU: down(act(gate(x)) * up(x))) or plain (down(act(up(x))))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "gated"
        if self.gated:
            self.gate_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """One transformer layer, pre-LN (GPT-2, Llama, T5) or post-LN (BERT).

    Norm names say where each norm sits: ``input_layernorm`` before attention (pre-LN),
    ``post_attention_layernorm`` right after attention (pre-LN: before the MLP; post-LN: after the
    attention residual), ``post_mlp_layernorm`` after the MLP residual (post-LN only). Decoders of
    an encoder-decoder add ``cross_attn`` between attention and MLP, with ``cross_attn_layernorm``
    before it (pre-LN) or after its residual (post-LN).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_ln = config.norm_position == "pre"
        if self.pre_ln:
            self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        if config.cross_attention:
            self.cross_attn_layernorm = make_norm(config)
            self.cross_attn = Attention(config, layer_idx, cross=True)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        if not self.pre_ln:
            self.post_mlp_layernorm = make_norm(config)

    def forward(self, x, mask, rope, cache, need_weights=False, cross=None, unpadded=None):
        """``cross``: (encoder output (B, S, C) or None when the cache holds its keys/values, encoder
        padding mask (B, 1, 1, S) or None) for blocks with cross-attention. ``unpadded``: x is (N, C),
        the real tokens of a padded batch (see ``Unpadded``); not with cross-attention."""
        if self.pre_ln:
            a, w = self.self_attn(self.input_layernorm(x), mask, rope, cache, need_weights, unpadded=unpadded)
            x = x + a
            if cross is not None:
                memory, memory_mask = cross
                x = x + self.cross_attn(self.cross_attn_layernorm(x), memory_mask, None, cache, memory=memory)[0]
            x = x + self.mlp(self.post_attention_layernorm(x))
        else:
            a, w = self.self_attn(x, mask, rope, cache, need_weights, unpadded=unpadded)
            x = self.post_attention_layernorm(x + a)
            if cross is not None:
                memory, memory_mask = cross
                x = self.cross_attn_layernorm(x + self.cross_attn(x, memory_mask, None, cache, memory=memory)[0])
            x = self.post_mlp_layernorm(x + self.mlp(x))
        return x, w
