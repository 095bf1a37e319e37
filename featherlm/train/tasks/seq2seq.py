"""Sequence-to-sequence tasks: translation (BLEU, chrF) and summarization (ROUGE-1/2/L).

Pairs (``featherlm.data.pairs``) train either model kind from the same examples:

    decoder-only    prompt + target in one sequence, the loss on the target tokens only (like sft);
                    the prompt is the user turn of the chat template when the tokenizer has one
    encoder-decoder prompt -> encoder, target -> decoder labels (teacher forcing), as T5 trains

A batch holds both layouts' material: ``input_ids`` are the prompts padded on the left followed by
the targets padded on the right, ``prompt_width`` says where the two meet. A decoder reads the row
as it is (the left padding is what batched generation wants too); an encoder-decoder splits it.

Evaluation reports the loss over all evaluation pairs, then generates (greedy or beam, batched)
for the first ``data.max_eval_generate`` of them and scores the outputs against the references.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.data import IGNORE_INDEX
from featherlm.data.pairs import encode_pairs, read_pairs
from featherlm.errors import ConfigError, DataError
from featherlm.evaluate.text_metrics import bleu, chrf, has_cjk, rouge
from featherlm.generate import GenerationConfig, generate_ids
from featherlm.train.tasks.base import Task, TaskData, autocast, evaluating

CHINESE = {"chinese", "mandarin", "zh", "zh-cn", "zh-tw", "cmn", "中文", "汉语", "普通话"}


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "encoder_decoder", False))


class Seq2SeqTask(Task):
    """Shared by translation and summarization; they differ in the default prompt and the metrics."""

    template: str = "{source}"

    # ---- data
    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        d = cfg.data
        template = self.prompt_template(cfg)
        chat = tokenizer.chat_template is not None if d.chat_template is None else d.chat_template
        if chat and tokenizer.chat_template is None:
            raise ConfigError(f"data.chat_template is true, but the tokenizer ({tokenizer.source}) has none")
        pairs = read_pairs(path, source_column=d.source_column, target_column=d.target_column, format=d.format,
                           skip_bad_rows=skip_bad_rows)
        examples, bad = encode_pairs(pairs, tokenizer, template=template, source_lang=d.source_lang,
                                     target_lang=d.target_lang, chat=chat, system=d.system,
                                     max_seq_len=cfg.train.max_seq_len)
        if bad and not skip_bad_rows:
            raise DataError(path, *bad[0])
        return TaskData(pairs.path, examples, pairs.skipped + bad, pairs)

    def prompt_template(self, cfg) -> str:
        """``data.prompt`` or the task's default, checked: known fields only, and the language names it uses set."""
        d, template = cfg.data, cfg.data.prompt or self.template
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as e:
            raise ConfigError(f"data.prompt {template!r} is not a valid template ({e}); write braces as {{{{ }}}}") \
                from None
        unknown = fields - {"source", "source_lang", "target_lang"}
        if unknown or "source" not in fields:
            raise ConfigError(f"data.prompt {template!r} must contain {{source}} and may contain {{source_lang}} "
                              f"and {{target_lang}}" + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
        missing = [f"data.{f}" for f in ("source_lang", "target_lang") if f in fields and not getattr(d, f)]
        if missing:
            raise ConfigError(f"the prompt of task {self.name!r} names the languages: set {' and '.join(missing)} "
                              f"(e.g. English, French), or write your own data.prompt")
        return template

    # ---- model
    def build_model(self, backbone, cfg) -> nn.Module:
        if not backbone.config.causal:
            raise ConfigError(f"task {self.name!r} generates text: it needs a decoder or an encoder-decoder, "
                              f"not an encoder ({backbone.config.family})")
        return backbone

    # ---- training
    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Prompts padded on the left, then targets padded on the right: ``input_ids``, ``attention_mask``
        and ``labels`` (B, P + T) with the loss on target tokens only, and ``prompt_width`` (P)."""
        B = len(examples)
        prompts = [e["input_ids"][: e["prompt_len"]] for e in examples]
        targets = [e["input_ids"][e["prompt_len"]:] for e in examples]
        P, T = max(len(p) for p in prompts), max(len(t) for t in targets)
        input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, P + T, dtype=torch.long)
        labels = torch.full((B, P + T), IGNORE_INDEX, dtype=torch.long)
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            input_ids[i, P:P + len(t)] = torch.tensor(t, dtype=torch.long)
            attention_mask[i, P - len(p):P + len(t)] = 1
            labels[i, P:P + len(t)] = torch.tensor(t, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "prompt_width": torch.tensor(P)}

    def terms(self, batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def logits_and_labels(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits of every target position and its label, (B, T, V) and (B, T)."""
        P = int(batch["prompt_width"])
        labels = batch["labels"][:, P:]  # (B, T)
        if is_encoder_decoder(model):
            # right-padded targets under causal attention: real positions never see the padding, so the
            # decoder needs no mask of its own
            out = model(batch["input_ids"][:, :P], attention_mask=batch["attention_mask"][:, :P],
                        decoder_input_ids=model.shift_right(labels))
            return out.logits, labels
        # position t predicts token t + 1: the targets' logits are those of positions P-1 .. P+T-2
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_from=P - 1).logits
        return logits[:, :-1], labels  # (B, T, V)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        logits, labels = self.logits_and_labels(model, batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss, int((labels != IGNORE_INDEX).sum())

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self, model, data, *, cfg, tokenizer, batch_size, pad_id, bf16=False) -> dict[str, Any]:
        """Loss and perplexity over ``data``; the task's metrics on the outputs generated for its first
        ``data.max_eval_generate`` pairs; ``predictions`` (those outputs, in order) and ``generated``."""
        scores = super().evaluate(model, data, cfg=cfg, tokenizer=tokenizer, batch_size=batch_size, pad_id=pad_id,
                                  bf16=bf16)  # loss, perplexity, tokens
        limit = cfg.data.max_eval_generate or len(data.examples)
        chosen = data.examples[:limit]
        with evaluating(model):
            predictions = self.generate(model, tokenizer, chosen, cfg, batch_size, pad_id, bf16)
        references = [data.source.targets[e["index"]] for e in chosen]
        return {**scores, **self.score(predictions, references, cfg), "generated": len(predictions),
                "predictions": predictions}

    def generate(self, model, tokenizer, examples: Sequence[dict[str, Any]], cfg, batch_size: int, pad_id: int,
                 bf16: bool = False) -> list[str]:
        """Output text for each example's prompt: batches of similar lengths, left-padded (generate_ids)."""
        d = cfg.data
        budget = d.eval_max_new_tokens or int(1.5 * max((len(e["input_ids"]) - e["prompt_len"] for e in examples),
                                                        default=1)) + 8
        gen = GenerationConfig(max_new_tokens=budget, num_beams=d.eval_beams)
        prompts = [e["input_ids"][: e["prompt_len"]] for e in examples]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            with autocast(bf16):
                new = generate_ids(model, [prompts[i] for i in index], gen, tokenizer.eos_ids, pad_id)
            for i, ids in zip(index, new, strict=True):
                out[i] = tokenizer.decode(ids).strip()
        return out

    def score(self, predictions: list[str], references: list[str], cfg) -> dict[str, Any]:
        raise NotImplementedError


class TranslationTask(Seq2SeqTask):
    name = "translation"
    metrics = ("bleu", "chrf", "loss", "perplexity")
    template = "Translate {source_lang} to {target_lang}: {source}"  # close to T5's "translate English to German: "

    def score(self, predictions, references, cfg) -> dict[str, Any]:
        """Corpus BLEU (sacrebleu's 13a tokenizer, "zh" for Chinese targets) and chrF, both 0-100."""
        lang = cfg.data.target_lang.strip().lower()
        chinese = lang in CHINESE or (not lang and has_cjk(references))
        b = bleu(predictions, references, tokenize="zh" if chinese else "13a")
        return {"bleu": b["bleu"], "chrf": chrf(predictions, references)["chrf"], "bleu_signature": b["signature"]}


class SummarizationTask(Seq2SeqTask):
    name = "summarization"
    metrics = ("rougeL", "rouge1", "rouge2", "loss", "perplexity")
    template = "Summarize: {source}"  # T5's "summarize: "

    def score(self, predictions, references, cfg) -> dict[str, Any]:
        """ROUGE-1/2/L F-measures (rouge-score with stemming; Chinese scored by characters), 0-1."""
        r = rouge(predictions, references)
        return {k: r[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
