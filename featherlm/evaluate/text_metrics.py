"""Text-generation metrics: corpus BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score).

Pure functions on lists of strings, importing nothing from featherlm: the trainer uses them to
pick checkpoints of sequence-to-sequence runs (see the placement note in tests/test_layering.py).
The reference packages do the counting, so the numbers are the ones papers report; this module
only fixes the input layout and the degenerate cases the packages leave undefined or crash on.

References come in sacrebleu's layout: either one list of strings (one reference per
hypothesis), or several such lists ("reference streams", each as long as the hypotheses) when
every hypothesis has several references. Scores are on sacrebleu's 0-100 scale for BLEU and chrF
and on rouge-score's 0-1 scale for ROUGE, as each field reports them.

Degenerate cases: no hypotheses at all gives 0.0 for every score (sacrebleu raises an IndexError
there); empty strings are passed to the packages as they are (sacrebleu scores an empty corpus
0.0, rouge-score gives 0.0 to a pair with an empty side).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

# Characters scored one by one by the "zh" ROUGE tokenizer: CJK ideographs (with the extensions and
# compatibility blocks), kana and hangul syllables. Scripts written without spaces have no words for a
# whitespace tokenizer to find; characters are the unit Chinese ROUGE is commonly computed on.
_CJK = ("\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
        "\uf900-\ufaff\U00020000-\U0002fa1f")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_ZH_TOKEN = re.compile(f"[{_CJK}]|[a-z0-9]+")


def _streams(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """References as a list of streams, each as long as ``hypotheses`` (sacrebleu's layout)."""
    if isinstance(hypotheses, str):
        raise ValueError("hypotheses must be a list of strings, not one string")
    if isinstance(references, str):
        raise ValueError("references must be a list of strings (or of lists of strings), not one string")
    refs = list(references)
    if all(isinstance(r, str) for r in refs):
        streams = [refs]
    elif all(isinstance(r, (list, tuple)) for r in refs):
        streams = [list(r) for r in refs]
        if not streams:
            raise ValueError("references is an empty list of streams")
    else:
        raise ValueError("references must be a list of strings or a list of lists of strings, not a mix")
    for i, stream in enumerate(streams):
        if len(stream) != len(hypotheses):
            raise ValueError(f"reference stream {i} has {len(stream)} strings for {len(hypotheses)} hypotheses")
        if not all(isinstance(s, str) for s in stream):
            raise ValueError(f"reference stream {i} holds a value that is not a string")
    if not all(isinstance(h, str) for h in hypotheses):
        raise ValueError("every hypothesis must be a string")
    return streams


def _empty_signature(metric, n_streams: int) -> str:
    """sacrebleu writes a signature only after scoring: score one empty pair per stream to get it."""
    metric.corpus_score([""], [[""]] * n_streams)
    return str(metric.get_signature())


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
         tokenize: str = "13a", lowercase: bool = False) -> dict[str, Any]:
    """Corpus-level BLEU (sacrebleu): ``{"bleu", "precisions", "bp", "sys_len", "ref_len", "n",
    "signature"}``; ``bleu`` and the n-gram ``precisions`` in 0-100.

    ``tokenize``: "13a" (the WMT default), "zh" for Chinese targets (each Chinese character a
    token), or any other sacrebleu tokenizer ("intl", "char", "none"). The signature records
    every setting, so a reported score can be reproduced.
    """
    from sacrebleu.metrics import BLEU

    streams = _streams(hypotheses, references)
    if tokenize not in BLEU.TOKENIZERS:
        raise ValueError(f"unknown BLEU tokenizer {tokenize!r}; expected one of {', '.join(BLEU.TOKENIZERS)}")
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    if not hypotheses:
        return {"bleu": 0.0, "precisions": [0.0] * 4, "bp": 0.0, "sys_len": 0, "ref_len": 0, "n": 0,
                "signature": _empty_signature(metric, len(streams))}
    score = metric.corpus_score(list(hypotheses), streams)
    return {"bleu": float(score.score), "precisions": [float(p) for p in score.precisions], "bp": float(score.bp),
            "sys_len": int(score.sys_len), "ref_len": int(score.ref_len), "n": len(hypotheses),
            "signature": str(metric.get_signature())}


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
         word_order: int = 0, lowercase: bool = False) -> dict[str, Any]:
    """Corpus-level chrF (sacrebleu; ``word_order=2`` gives chrF++): ``{"chrf", "n", "signature"}``,
    ``chrf`` in 0-100. Character n-grams need no tokenizer, so it suits Chinese as it is."""
    from sacrebleu.metrics import CHRF

    streams = _streams(hypotheses, references)
    metric = CHRF(word_order=word_order, lowercase=lowercase)
    if not hypotheses:
        return {"chrf": 0.0, "n": 0, "signature": _empty_signature(metric, len(streams))}
    score = metric.corpus_score(list(hypotheses), streams)
    return {"chrf": float(score.score), "n": len(hypotheses), "signature": str(metric.get_signature())}


class CharTokenizer:
    """rouge-score tokenizer for text written without spaces: every CJK character is a token, runs of
    Latin letters and digits are words (lowercased, as rouge-score's own tokenizer does), the rest
    separates. Stemming does not apply to characters; Latin words are stemmed when asked."""

    def __init__(self, use_stemmer: bool = False) -> None:
        self.stemmer = None
        if use_stemmer:
            from nltk.stem import porter

            self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _ZH_TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
        if self.stemmer is None:
            return tokens
        # rouge-score stems only words longer than 3 characters; do the same for the Latin words
        return [self.stemmer.stem(t) if len(t) > 3 and not _CJK_CHAR.match(t) else t for t in tokens]


def has_cjk(texts: Sequence[str]) -> bool:
    return any(_CJK_CHAR.search(t) for t in texts)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
          use_stemmer: bool = True, tokenize: str = "auto") -> dict[str, Any]:
    """ROUGE-1/2/L/Lsum (rouge-score, Porter stemming by default), averaged over the pairs.

    Returns ``{"rouge1", "rouge2", "rougeL", "rougeLsum"}`` (mean F-measure, 0-1) plus
    ``"<type>_precision"`` and ``"<type>_recall"`` means and ``"n"``. With several reference
    streams a prediction takes its best-matching reference (rouge-score's ``score_multi``).
    ``rougeLsum`` splits summaries at newlines, as summarization papers compute it.

    ``tokenize``: "default" is rouge-score's own tokenizer (ASCII letters and digits only: it
    deletes every Chinese character), "zh" scores CJK characters one by one (see
    ``CharTokenizer``), "auto" picks "zh" when any text holds a CJK character.
    """
    from rouge_score import rouge_scorer

    streams = _streams(predictions, references)
    if tokenize not in ("auto", "default", "zh"):
        raise ValueError(f"unknown ROUGE tokenizer {tokenize!r}; expected auto, default or zh")
    if tokenize == "auto":
        tokenize = "zh" if has_cjk(list(predictions)) or any(has_cjk(s) for s in streams) else "default"
    tokenizer = CharTokenizer(use_stemmer) if tokenize == "zh" else None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer, tokenizer=tokenizer)
    totals = {f"{t}{part}": 0.0 for t in ROUGE_TYPES for part in ("", "_precision", "_recall")}
    for i, prediction in enumerate(predictions):
        refs = [s[i] for s in streams]
        scores = scorer.score(refs[0], prediction) if len(refs) == 1 else scorer.score_multi(refs, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
            totals[f"{t}_precision"] += scores[t].precision
            totals[f"{t}_recall"] += scores[t].recall
    n = len(predictions)
    return {**{k: float(v) / n if n else 0.0 for k, v in totals.items()}, "n": n, "tokenize": tokenize}


__all__ = ["bleu", "chrf", "rouge", "CharTokenizer", "has_cjk", "ROUGE_TYPES"]
