"""The encoder-decoder (T5): two stacks of the one ``Transformer`` sharing one embedding table.

    encoder  Transformer(causal=False, position="relative")   source ids -> hidden (B, S, C)
    decoder  Transformer(causal=True, cross_attention=True)   target ids + encoder hidden -> logits

Both stacks are plain ``Transformer`` instances built from the same ``Block``s as every other family,
so parameter names read ``encoder.layers.N.self_attn.q_proj``, ``decoder.layers.N.cross_attn.v_proj``,
``decoder.layers.N.mlp.down_proj``: a PEFT target list (``q_proj``, ``v_proj``...) selects the same
kinds of layers as on Llama or BERT, in self- and cross-attention alike. The decoder's
``embed_tokens`` *is* the encoder's (T5's ``shared``), so ``state_dict`` names it twice (as
``transformers`` does); ``featherlm.checkpoint`` writes it once and fills the alias when loading.

T5's particulars are config fields: relative position bias (``position="relative"``), no score
scaling (``attn_scale=False``), RMSNorm, ReLU or gated-GELU MLP, and with tied embeddings the
decoder output scaled by d_model**-0.5 (``scale_output``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from featherlm.config import ModelConfig
from featherlm.errors import ConfigError
from featherlm.model.layers import KVCache
from featherlm.model.transformer import ModelOutput, Transformer

IGNORE_INDEX = -100  # label of a position without loss (as featherlm.data.IGNORE_INDEX; model imports no data)


def stack_config(config: ModelConfig, decoder: bool) -> ModelConfig:
    """The config of one stack: the encoder is bidirectional without an output layer; the decoder is
    causal, attends to the encoder, and owns the output layer (or the tied, scaled unembedding)."""
    return dataclasses.replace(
        config, encoder_decoder=False, n_decoder_layer=None, causal=decoder, cross_attention=decoder,
        n_layer=config.n_decoder_layer if decoder else config.n_layer,
        scale_output=config.scale_output and decoder,
    )


class Seq2SeqTransformer(nn.Module):
    """An encoder and a decoder ``Transformer``; ``forward`` runs both, ``encode`` the encoder only."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.encoder_decoder:
            raise ConfigError("Seq2SeqTransformer needs a config with encoder_decoder=True (e.g. preset('t5'))")
        self.config = config
        self.encoder = Transformer(stack_config(config, decoder=False))
        self.decoder = Transformer(stack_config(config, decoder=True))
        self.decoder.embed_tokens = self.encoder.embed_tokens  # one table for both sides, as T5's `shared`
        self.reset_parameters()

    # ------------------------------------------------------------------ what generation and heads use

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    @property
    def output_weight(self) -> torch.Tensor:
        return self.decoder.output_weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the shared table once

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A decoder cache: self-attention keys/values of up to ``max_len`` target positions, plus the
        cross-attention keys/values of the encoder output (filled by the first forward)."""
        return self.decoder.new_cache(batch_size, max_len)

    def init_buffers(self) -> None:
        self.encoder.init_buffers()
        self.decoder.init_buffers()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T5's init (``initializer_range`` is its factor f): since scores are not divided by sqrt(D),
        q_proj starts f / sqrt(C * D) small; the other projections f / sqrt(fan_in); embeddings and
        an untied output layer N(0, f); norms 1."""
        cfg, f = self.config, self.config.initializer_range
        C, D, H = cfg.d_model, cfg.head_dim, cfg.n_head
        for name, module in self.named_modules():
            last = name.rsplit(".", 1)[-1]
            std = {"q_proj": f * (C * D) ** -0.5, "o_proj": f * (H * D) ** -0.5, "down_proj": f * cfg.d_ff**-0.5,
                   "relative_attention_bias": f * C**-0.5, "embed_tokens": f, "lm_head": f}.get(last, f * C**-0.5)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif getattr(module, "weight", None) is not None and module.weight.dim() == 1:
                nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ forward

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               output_attentions: bool = False) -> ModelOutput:
        """The encoder's output for ``input_ids`` (B, S): ``hidden`` (B, S, C)."""
        return self.encoder(input_ids, attention_mask=attention_mask, output_attentions=output_attentions)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, S) source; not needed when encoder_hidden or the cache has it
        *,
        decoder_input_ids: torch.Tensor,  # (B, T) target so far, starting with decoder_start_token_id
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real source token
        decoder_attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real target token
        encoder_hidden: torch.Tensor | None = None,  # (B, S, C) from `encode`, to encode once and decode often
        cache: KVCache | None = None,
        output_attentions: bool = False,
        last_only: bool = False,
    ) -> ModelOutput:
        """Logits (B, T, V) of the next target token at each decoder position (teacher forcing), or
        with a cache one decoding step: the first call brings the source (or ``encoder_hidden``),
        later calls only the new target tokens."""
        cached = cache is not None and cache.cross_keys[0] is not None
        if encoder_hidden is None and not cached:
            if input_ids is None:
                raise ValueError("pass input_ids (or encoder_hidden) on the first call of a sequence")
            encoder_hidden = self.encode(input_ids, attention_mask).hidden  # (B, S, C)
        out = self.decoder(decoder_input_ids, attention_mask=decoder_attention_mask, cache=cache,
                           output_attentions=output_attentions, last_only=last_only,
                           encoder_hidden=encoder_hidden, encoder_mask=attention_mask)
        out.encoder_hidden = encoder_hidden
        return out

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: labels (B, T) moved one step right behind the start token,
        ignored positions (IGNORE_INDEX) read as padding; so position t predicts labels[:, t]."""
        start = self.config.decoder_start_token_id
        if start is None:
            raise ConfigError("the model config has no decoder_start_token_id")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else start
        shifted = torch.cat([labels.new_full((labels.shape[0], 1), start), labels[:, :-1]], dim=1)  # (B, T)
        return shifted.masked_fill(shifted == IGNORE_INDEX, pad)
