"""BLEU, chrF and ROUGE against the reference packages on the same inputs, and the degenerate cases."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from featherlm.evaluate.text_metrics import bleu, chrf, rouge

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hello there general kenobi",
        "It was raining; we stayed in."]
REFS = ["the cat is sitting on the mat", "the quick brown fox jumped over the lazy dog", "hello there",
        "It rained, so we stayed inside."]
REFS2 = ["a cat sat on a mat", "a fast brown fox leaps over a lazy dog", "general kenobi, hello there",
         "We stayed in because it was raining."]
ZH_HYPS = ["我喜欢吃苹果。", "今天天气很好", "他在北京工作了三年"]
ZH_REFS = ["我很喜欢吃苹果。", "今天的天气非常好", "他在上海工作了两年"]


def test_bleu_and_chrf_equal_sacrebleu_with_one_and_two_reference_streams():
    for refs in ([REFS], [REFS, REFS2]):
        ours = bleu(HYPS, refs if len(refs) > 1 else refs[0])
        theirs = sacrebleu.corpus_bleu(HYPS, refs)
        assert ours["bleu"] == pytest.approx(theirs.score)
        assert ours["precisions"] == pytest.approx(theirs.precisions)
        assert (ours["sys_len"], ours["ref_len"]) == (theirs.sys_len, theirs.ref_len)
        assert ours["bp"] == pytest.approx(theirs.bp)
        assert f"nrefs:{len(refs)}" in ours["signature"]
        assert chrf(HYPS, refs)["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, refs).score)
        assert chrf(HYPS, refs, word_order=2)["chrf"] == pytest.approx(
            sacrebleu.corpus_chrf(HYPS, refs, word_order=2).score)
    assert bleu(HYPS, [REFS, REFS2])["bleu"] > bleu(HYPS, REFS)["bleu"]  # a second reference can only help


def test_chinese_bleu_uses_the_zh_tokenizer():
    ours = bleu(ZH_HYPS, ZH_REFS, tokenize="zh")
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score)
    assert "tok:zh" in ours["signature"]
    # 13a keeps each unspaced Chinese sentence as (nearly) one token: the score says little
    assert ours["bleu"] > bleu(ZH_HYPS, ZH_REFS)["bleu"]
    with pytest.raises(ValueError, match="unknown BLEU tokenizer"):
        bleu(ZH_HYPS, ZH_REFS, tokenize="chinese")


def test_rouge_equals_rouge_score_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    pairs = [scorer.score(r, h) for h, r in zip(HYPS, REFS, strict=True)]
    ours = rouge(HYPS, REFS)
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert ours[t] == pytest.approx(sum(p[t].fmeasure for p in pairs) / len(pairs))
        assert ours[f"{t}_precision"] == pytest.approx(sum(p[t].precision for p in pairs) / len(pairs))
        assert ours[f"{t}_recall"] == pytest.approx(sum(p[t].recall for p in pairs) / len(pairs))
    assert ours["n"] == len(HYPS) and ours["tokenize"] == "default"
    # stemming matters: "jumps"/"jumped" match only with it
    assert rouge(["jumps"], ["jumped"])["rouge1"] == 1.0
    assert rouge(["jumps"], ["jumped"], use_stemmer=False)["rouge1"] == 0.0


def test_rouge_with_several_references_takes_the_best_match():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ours = rouge(HYPS, [REFS, REFS2])
    expected = [scorer.score_multi([a, b], h) for h, a, b in zip(HYPS, REFS, REFS2, strict=True)]
    for t in ("rouge1", "rouge2", "rougeL"):
        assert ours[t] == pytest.approx(sum(e[t].fmeasure for e in expected) / len(expected))


def test_chinese_rouge_scores_characters():
    # rouge-score's own tokenizer deletes every Chinese character: all pairs score 0
    assert rouge(ZH_HYPS, ZH_REFS, tokenize="default")["rouge1"] == 0.0
    ours = rouge(ZH_HYPS, ZH_REFS)  # auto -> characters
    assert ours["tokenize"] == "zh"
    # oracle: spell each character as its own ASCII word (2 letters: never stemmed) and let
    # rouge-score's default tokenizer count the same tokens
    chars = sorted({c for t in ZH_HYPS + ZH_REFS for c in t if c not in "。"})
    spell = {c: "q" + "abcdefghijklmnopqrstuvwxyz"[i] for i, c in enumerate(chars)}
    assert len(chars) <= 26

    def words(text):
        return " ".join(spell[c] for c in text if c in spell)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [scorer.score(words(r), words(h)) for h, r in zip(ZH_HYPS, ZH_REFS, strict=True)]
    for t in ("rouge1", "rouge2", "rougeL"):
        assert ours[t] == pytest.approx(sum(p[t].fmeasure for p in pairs) / len(pairs))
    # by hand, first pair: 我喜欢吃苹果 (6 chars) vs 我很喜欢吃苹果 (7): 6 shared, P 1, R 6/7
    first = rouge(ZH_HYPS[:1], ZH_REFS[:1])
    assert first["rouge1_precision"] == pytest.approx(1.0)
    assert first["rouge1_recall"] == pytest.approx(6 / 7)


def test_mixed_chinese_and_latin_words_tokenize_both():
    ours = rouge(["我用Python写代码"], ["我用 python 写程序"])
    # tokens: 我 用 python 写 代 码  vs  我 用 python 写 程 序  -> 4 of 6 shared
    assert ours["rouge1"] == pytest.approx(4 / 6)


def test_degenerate_inputs():
    # no hypotheses at all: every score 0 (sacrebleu itself raises on an empty corpus)
    assert bleu([], [])["bleu"] == 0.0 and bleu([], [])["n"] == 0
    assert bleu([], [[], []])["signature"].startswith("nrefs:2")
    assert chrf([], [])["chrf"] == 0.0
    empty = rouge([], [])
    assert empty["rouge1"] == empty["rougeL"] == empty["rouge2_recall"] == 0.0 and empty["n"] == 0
    # empty strings: exactly what the packages give
    for hyps, refs in ((["", ""], ["a b c", "d e"]), (["a b c", ""], ["", ""]), ([""], [""])):
        assert bleu(hyps, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
        assert chrf(hyps, refs)["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        expected = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)) / len(hyps)
        assert rouge(hyps, refs)["rougeL"] == pytest.approx(expected)
    assert rouge([""], ["a b"])["rouge1"] == 0.0
    short = sacrebleu.corpus_bleu(["the cat"], [["the cat"]]).score  # 0: no 3- and 4-grams at corpus level
    assert bleu(["the cat"], ["the cat"])["bleu"] == pytest.approx(short)


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="2 strings for 1 hypotheses"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="not one string"):
        rouge("a b", ["a b"])
    with pytest.raises(ValueError, match="not a mix"):
        chrf(["a"], ["a", ["b"]])
    with pytest.raises(ValueError, match="stream 1 has 2"):
        bleu(["a"], [["a"], ["a", "b"]])
    with pytest.raises(ValueError, match="unknown ROUGE tokenizer"):
        rouge(["a"], ["a"], tokenize="jieba")
