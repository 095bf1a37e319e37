"""Task heads on top of the one ``Transformer``: sequence classification, token classification (NER),
span extraction (extractive QA).

The head wraps a backbone instead of subclassing it, so every family (BERT encoder, Llama or
GPT-2 decoder) gets the same head, and the backbone keeps its parameter names under ``backbone.``:
a PEFT target list (``q_proj``, ``v_proj``...) matches the same layers as on the bare model, and
``modules_to_save=["classifier"]`` trains the new output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from featherlm.errors import ConfigError
from featherlm.model.transformer import Transformer

Pooling = Literal["auto", "pooler", "cls", "mean", "last"]


@dataclass
class ClassifierConfig:
    """What the head adds to a backbone: label names (their order gives the ids), pooling, dropout.

    ``pooling``: "pooler" is BERT's pooled output ([CLS] through dense + tanh), "cls" the raw
    first hidden state, "mean" the average over real tokens, "last" the last real token (the only
    position that has seen the whole text in a decoder). "auto" picks "last" for decoders, the
    pooler for encoders that have one, "mean" for other encoders.
    """

    labels: list[str] = field(default_factory=list)
    pooling: Pooling = "auto"
    dropout: float = 0.1  # BERT's fine-tuning default; regularises the freshly initialised classifier

    @property
    def num_labels(self) -> int:
        return len(self.labels)


class SequenceClassifier(nn.Module):
    """``backbone`` (a Transformer) -> pooled vector (B, C) -> dropout -> ``classifier`` -> logits (B, L)."""

    def __init__(self, backbone: Transformer, config: ClassifierConfig) -> None:
        super().__init__()
        if config.num_labels < 2:
            raise ConfigError(f"a classifier needs at least 2 labels, got {config.labels!r}")
        self.backbone = backbone
        self.config = config
        self.pooling = resolve_pooling(config.pooling, backbone.config.causal, backbone.config.pooler)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(backbone.config.d_model, config.num_labels)
        # BERT's init for new heads: small normal weights, zero bias, so the first logits are near 0
        # and the first loss near log(num_labels) whatever the backbone's activation scale.
        nn.init.normal_(self.classifier.weight, std=backbone.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
             pooled: torch.Tensor | None) -> torch.Tensor:
        """One vector per row (B, C) from the final hidden states (B, T, C)."""
        B, T, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
        if self.pooling == "pooler":
            return pooled
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        # "last": index of the last real token, right- or left-padded alike
        positions = torch.arange(T, device=hidden.device).expand(B, T)
        last = (positions * attention_mask.long()).argmax(-1)  # (B,)
        return hidden[torch.arange(B, device=hidden.device), last]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token
        token_type_ids: torch.Tensor | None = None,  # (B, T) BERT segments
    ) -> torch.Tensor:
        out = self.backbone(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        h = self.pool(out.hidden, attention_mask, out.pooled)  # (B, C)
        return self.classifier(self.dropout(h))  # (B, L)


class TokenClassifier(nn.Module):
    """``backbone`` -> final hidden states (B, T, C) -> dropout -> ``classifier`` -> logits (B, T, L):
    one label per token (named entities), as transformers' ``BertForTokenClassification``.

    ``case_classes`` > 0 adds casing features for uncased tokenizers, which turn "Bush" into "bush":
    ``case_embed`` holds a learned vector per casing class of a token's word *as written* (the classes
    of ``featherlm.data.ner.CASE_CLASSES``: lower, Title, ALL CAPS...), added to the token embeddings
    as BERT adds its token-type vectors, so that every layer can use them (in a CoNLL-2003 pilot this
    scored a little above adding them to the final states, 0.785 vs 0.779 valid F1: docs/benchmarks.md).
    Forward then needs ``case_ids`` (B, T). ``case_embed`` starts at zero: the head starts as the one
    without it.
    """

    def __init__(self, backbone: Transformer, labels: list[str], dropout: float = 0.1, case_classes: int = 0) -> None:
        super().__init__()
        if len(labels) < 2:
            raise ConfigError(f"a token classifier needs at least 2 labels, got {labels!r}")
        self.backbone = backbone
        self.labels = list(labels)
        self.case_classes = case_classes
        self.dropout = nn.Dropout(dropout)  # BERT's default: regularises the fresh classifier
        self.classifier = nn.Linear(backbone.config.d_model, len(labels))
        nn.init.normal_(self.classifier.weight, std=backbone.config.initializer_range)  # first logits near 0
        nn.init.zeros_(self.classifier.bias)
        self.case_embed: nn.Embedding | None = None
        if case_classes:
            self.case_embed = nn.Embedding(case_classes, backbone.config.d_model)
            nn.init.zeros_(self.case_embed.weight)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        case_ids: torch.Tensor | None = None,  # (B, T) casing class of each token's word; 0: none (specials)
    ) -> torch.Tensor:
        if self.case_embed is None:
            hidden = self.backbone(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).hidden
            return self.classifier(self.dropout(hidden))  # (B, T, L)
        if case_ids is None:
            raise ValueError("this token classifier uses casing features: pass case_ids (B, T)")
        if case_ids.shape != input_ids.shape:
            raise ValueError(f"case_ids {tuple(case_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        hidden = self.backbone(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               extra_embeds=self.case_embed(case_ids)).hidden  # casing vectors (B, T, C) added
        return self.classifier(self.dropout(hidden))  # (B, T, L)


class SpanExtractor(nn.Module):
    """``backbone`` -> final hidden states (B, T, C) -> ``qa_outputs`` Linear(C, 2) -> start and end logits
    (B, T) each: extractive QA, as transformers' ``BertForQuestionAnswering`` (no dropout there either)."""

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.qa_outputs = nn.Linear(backbone.config.d_model, 2)
        nn.init.normal_(self.qa_outputs.weight, std=backbone.config.initializer_range)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token
        token_type_ids: torch.Tensor | None = None,  # (B, T) 0 = question, 1 = context (BERT segments)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).hidden
        logits = self.qa_outputs(hidden)  # (B, T, 2)
        return logits[..., 0], logits[..., 1]  # (B, T) start, (B, T) end


def resolve_pooling(pooling: str, causal: bool, has_pooler: bool) -> str:
    """The concrete pooling for a backbone ("auto" resolved); ConfigError on impossible choices."""
    if pooling == "auto":
        return "last" if causal else "pooler" if has_pooler else "mean"
    if pooling == "pooler" and not has_pooler:
        raise ConfigError("pooling 'pooler' needs a backbone with a pooler (BERT); use 'mean', 'cls' or 'last'")
    if pooling == "cls" and causal:
        # the first token of a decoder sees only itself: its state says nothing about the text
        raise ConfigError("pooling 'cls' on a decoder sees only the first token; use 'last' or 'mean'")
    if pooling not in ("pooler", "cls", "mean", "last"):
        raise ConfigError(f"unknown pooling {pooling!r}; expected auto, pooler, cls, mean or last")
    return pooling
