"""The one transformer: decoders (GPT-2, Llama) and encoders (BERT) from the same blocks.

Parameter names follow Hugging Face Llama without the ``model.`` prefix (``embed_tokens``,
``layers.N.self_attn.q_proj``, ``layers.N.mlp.gate_proj``, ``norm``, ``lm_head``) for every family,
so a PEFT target list means the same thing everywhere and Llama conversion is the identity.
A ``Transformer`` is also one stack of an encoder-decoder (T5, see ``seq2seq.py``): with
``position="relative"`` it owns T5's relative position bias, and with ``cross_attention`` its blocks
attend to an encoder's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featherlm.config import ModelConfig
from featherlm.errors import ConfigError
from featherlm.model.layers import (
    Block,
    KVCache,
    Linear,
    Unpadded,
    linear,
    make_norm,
    relative_buckets,
    rope_cos_sin,
    rope_inv_freq,
    sinusoidal_table,
)

# Skip the padding positions' work (see Unpadded) when at least this fraction of a batch is padding.
# Measured on MiniLM-L6 LoRA training (CPU): each layer's gathers and scatters cost about as much as
# computing a few percent of its positions.
UNPAD_MIN_PADDING = 0.1


@dataclass
class ModelOutput:
    """What a forward pass returns.

    ``logits`` (B, T, V) for decoders (the last position only with ``last_only``, positions
    ``logits_from``.. only with that argument), None for encoders; ``hidden`` (B, T, C) is the final
    hidden state (at padding positions: unspecified, zero when their work was skipped); ``attentions``
    one (B, H, T, S) per layer when requested; ``pooled`` (B, C) is BERT's pooler output;
    ``encoder_hidden`` (B, S, C) the encoder's output in an encoder-decoder
    (None when a cache held it).
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor
    attentions: list[torch.Tensor] | None = None
    pooled: torch.Tensor | None = None
    encoder_hidden: torch.Tensor | None = None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.encoder_decoder:  # one stack cannot be both: building it would silently drop the encoder
            raise ConfigError("an encoder-decoder config (T5) is a Seq2SeqTransformer: build it with "
                              "featherlm.model.new_model(config)")
        self.config = config
        c = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, c)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, c)
        elif config.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(config.max_seq_len, c), persistent=False)
        elif config.position == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        elif config.position == "relative":  # T5: one learned bias per (distance bucket, head), shared by all layers
            self.relative_attention_bias = nn.Embedding(config.relative_buckets, config.n_head)
        if config.type_vocab_size:
            self.embed_token_types = nn.Embedding(config.type_vocab_size, c)
        if config.embed_norm:
            self.embed_norm = make_norm(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        if config.final_norm:
            self.norm = make_norm(config)
        if config.pooler:
            self.pooler = nn.Sequential()
            self.pooler.add_module("dense", Linear(c, c))
            self.pooler.add_module("act", nn.Tanh())
        if config.causal and not config.tie_embeddings:
            self.lm_head = Linear(c, config.vocab_size, bias=False)
        # Hook for prompt-style PEFT (prompt tuning): a module with ``num_tokens`` (P) called as
        # embed_prefix(B) -> (B, P, C): input vectors placed before the tokens. They carry no position
        # (no position embedding, RoPE angle 0), so the tokens keep positions 0..T-1; they enter with
        # the first forward of a sequence and are then held in the KV cache like tokens (see forward).
        self.embed_prefix: nn.Module | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ setup helpers

    def reset_parameters(self) -> None:
        """Random init as in GPT-2/BERT: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
                nn.init.ones_(module.weight)  # RMSNorm / LayerNorm
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def init_buffers(self) -> None:
        """Recompute the non-persistent position tables (needed after building on the meta device)."""
        device = self.embed_tokens.weight.device
        if self.config.position == "rope":
            self.inv_freq = rope_inv_freq(self.config).to(device)
        elif self.config.position == "sinusoidal":
            self.sinusoid = sinusoidal_table(self.config.max_seq_len, self.config.d_model).to(device)

    @property
    def output_weight(self) -> torch.Tensor:
        """The unembedding matrix (V, C); the embedding itself when tied."""
        return self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache for ``batch_size`` rows of up to ``max_len`` positions (default: the context)."""
        p = self.embed_tokens.weight
        dtype = torch.float32 if p.device.type == "cpu" else p.dtype  # see KVCache
        extra = self.embed_prefix.num_tokens if self.embed_prefix is not None else 0  # room for the prefix
        return KVCache(self.config, batch_size, (max_len or self.config.max_seq_len) + extra, dtype, p.device)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        *,
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, S = cache + T
        position_ids: torch.Tensor | None = None,  # (B, T)
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        cache: KVCache | None = None,
        output_attentions: bool = False,
        last_only: bool = False,  # decoders: logits of the last position only (generation)
        logits_from: int = 0,  # decoders: logits of positions logits_from.. only (a loss on a reply needs no more)
        encoder_hidden: torch.Tensor | None = None,  # (B, S, C) cross-attention input; None: the cache holds it
        encoder_mask: torch.Tensor | None = None,  # (B, S) 1 = real encoder position
        extra_embeds: torch.Tensor | None = None,  # (B, T, C) added to the token embeddings (a head's features)
    ) -> ModelOutput:
        cfg = self.config
        B, T = input_ids.shape
        P = self.embed_prefix.num_tokens if self.embed_prefix is not None else 0  # prompt-tuning vectors
        cached = cache.length if cache is not None else 0
        past = max(cached - P, 0)  # tokens before these: once filled, the cache also holds the P vectors
        new = P if cached == 0 else 0  # the prefix enters with the first chunk of a sequence only
        if past + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context of {cfg.max_seq_len}")
        if position_ids is None:
            position_ids = self.default_positions(B, T, past, attention_mask, input_ids.device)

        x = self.embed_tokens(input_ids)  # (B, T, C)
        if extra_embeds is not None:  # e.g. TokenClassifier's casing vectors, as BERT adds token types
            x = x + extra_embeds.to(x.dtype)
        if cfg.position == "learned":
            x = x + self.embed_positions(position_ids)
        elif cfg.position == "sinusoidal":
            x = x + self.sinusoid[position_ids].to(x.dtype)
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.embed_token_types(token_type_ids)
        rope_positions = position_ids
        if new:
            x = torch.cat([self.embed_prefix(B).to(x.dtype), x], dim=1)  # (B, P+T, C)
            rope_positions = torch.cat([position_ids.new_zeros(B, P), position_ids], dim=1)
        if P and attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, P+S)
        # A padded batch without a cache runs its real tokens only, as one (N, C) block: only attention
        # needs the (B, T) layout (see Unpadded). Not worth it for a few padding positions, whose
        # saving is smaller than the gathers and scatters of each layer.
        unpadded = None
        if (attention_mask is not None and cache is None and not cfg.cross_attention
                and UNPAD_MIN_PADDING * attention_mask.numel() <= attention_mask.numel() - int(attention_mask.sum())):
            unpadded = Unpadded(attention_mask)
            x = unpadded.unpad(x)  # (N, C)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        rope = rope_cos_sin(self.inv_freq, rope_positions, x.dtype) if cfg.position == "rope" else None
        mask = self.build_mask(attention_mask, B, new + T, cached)
        if cfg.position == "relative":
            mask = self.relative_bias(mask, new + T, cached)  # float (B|1, H, T, S): bias, -big where masked
        cross = self.cross_inputs(encoder_hidden, encoder_mask, cache) if cfg.cross_attention else None

        attentions: list[torch.Tensor] | None = [] if output_attentions else None
        for layer in self.layers:
            x, w = layer(x, mask, rope, cache, output_attentions, cross, unpadded)
            if attentions is not None:
                attentions.append(w)
        if cache is not None:
            cache.length += new + T
        if cfg.final_norm:
            x = self.norm(x)
        if unpadded is not None:
            x = unpadded.pad(x)  # (B, P+T, C), zeros at padding
        x = x[:, new:]  # drop the prefix positions: outputs line up with input_ids

        logits = pooled = None
        if cfg.causal:
            h = x[:, -1:] if last_only else x[:, logits_from:]
            if cfg.scale_output:  # T5 ties the unembedding to the input embedding and rescales for it
                h = h * cfg.d_model**-0.5
            logits = linear(h, self.output_weight)  # (B, T, V)
        if cfg.pooler:
            pooled = self.pooler(x[:, 0])
        return ModelOutput(logits=logits, hidden=x, attentions=attentions, pooled=pooled)

    def default_positions(self, B: int, T: int, past: int, attention_mask: torch.Tensor | None,
                          device: torch.device) -> torch.Tensor:
        """Positions 0.. for each row; with a padding mask on a decoder, counted from the first real
        token, so a left-padded prompt gets the same positions as the unpadded one."""
        if attention_mask is not None and self.config.causal:
            pos = attention_mask.long().cumsum(-1) - 1  # (B, S)
            return pos[:, past : past + T].clamp(min=0)
        return torch.arange(past, past + T, device=device).expand(B, T)

    def build_mask(self, attention_mask: torch.Tensor | None, B: int, T: int, past: int) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) mask, True where a query may attend; None when no mask is needed.

        Decoders combine causality with padding; every query may attend to itself, so a padding
        query never has an all-masked row (which would give NaN in softmax).
        """
        S = past + T
        if attention_mask is None:
            if self.config.causal and past > 0 and T > 1:  # chunked prefill onto a cache
                causal = torch.ones(T, S, dtype=torch.bool, device=self.embed_tokens.weight.device).tril(past)
                return causal[None, None]
            return None
        keys = attention_mask[:, None, None, :S].bool()  # (B, 1, 1, S)
        if not self.config.causal:
            return keys
        if T == 1 and bool(keys.all()):
            return None  # one new token attends to everything: skip building a mask
        causal = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(past)
        own = torch.zeros(T, S, dtype=torch.bool, device=attention_mask.device)
        own[torch.arange(T), past + torch.arange(T)] = True
        return (keys & causal) | own

    def relative_bias(self, mask: torch.Tensor | None, T: int, past: int) -> torch.Tensor:
        """T5's position bias for queries at past..past+T-1 over keys 0..past+T-1, as a float mask
        (B|1, H, T, S) with masked positions (padding, the future) at the dtype's lowest value.

        Computed once per forward and shared by every layer, as T5 computes it in the first layer and
        passes it on. Encoders bucket distances both ways, decoders only towards the past.
        """
        cfg, device = self.config, self.relative_attention_bias.weight.device
        S = past + T
        distance = torch.arange(S, device=device)[None, :] - torch.arange(past, S, device=device)[:, None]  # (T, S)
        buckets = relative_buckets(distance, not cfg.causal, cfg.relative_buckets, cfg.relative_max_distance)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)
        if mask is None and cfg.causal and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]
        if mask is not None:
            bias = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)  # (B|1, H, T, S)
        return bias

    def cross_inputs(self, encoder_hidden: torch.Tensor | None, encoder_mask: torch.Tensor | None,
                     cache: KVCache | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(encoder output, boolean key mask (B, 1, 1, S) or None) for the cross-attention of every block.

        With a cache, the first call of a sequence brings the encoder output (its keys and values and
        its padding mask are kept there); the decoding steps then pass neither.
        """
        memory_mask = None if encoder_mask is None else encoder_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        if encoder_hidden is None:
            if cache is None or cache.cross_keys[0] is None:
                raise ValueError("a decoder with cross-attention needs encoder_hidden (or a cache that holds it)")
            return None, cache.cross_mask
        if cache is not None:
            cache.cross_mask = memory_mask
        return encoder_hidden, memory_mask
