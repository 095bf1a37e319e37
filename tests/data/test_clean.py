"""Cleaning (HTML, control characters, Unicode normalisation, whitespace) and quality heuristics."""

from __future__ import annotations

import html
import unicodedata
from pathlib import Path

import lxml.html
import pytest

from featherlm.data.clean import QualityConfig, clean_text, length_ok, quality_reason, strip_html, text_stats

DATA = Path("/work/shared/data")
PAGE = """<!DOCTYPE html><html><head><title>T</title><style>p { color: red }</style></head>
<body><!-- navigation --><div class="main"><h1>Caf&eacute; &amp; Bar</h1>
<p>Prices: 3&nbsp;&euro; &lt;cheap&gt; &#20320;&#22909; &#x4E16;&#x754C;</p><ul><li>one</li><li>two</li></ul>
<p>Line<br/>break and <b>bold</b>, <a href="/x">link</a>.</p>
<script>var x = "<p>no</p>";</script></div></body></html>"""


def squash(text: str) -> str:
    return "".join(text.split())


def test_html_text_matches_lxml():
    ours = clean_text(PAGE)
    tree = lxml.html.fromstring(PAGE)
    for bad in tree.xpath("//script|//style|//head"):
        bad.drop_tree()
    assert squash(ours) == squash(tree.text_content())  # same text, entities decoded the same way
    assert "Café & Bar" in ours and "你好 世界" in ours and "<cheap>" in ours
    assert "color" not in ours and "var x" not in ours and "navigation" not in ours
    # block elements leave line breaks, inline ones do not split words
    assert "Line\nbreak and bold, link." in ours and "one\ntwo" in ours


@pytest.mark.parametrize("text", ["if a<b and c>d then", "List<String> xs = new ArrayList<>();", "x < y > z",
                                  "AT&T and R&D", "1 <= 2"])
def test_text_that_only_looks_like_html_survives(text):
    assert clean_text(text) == text


def test_entities_decode_like_the_standard_library():
    for text in ["&quot;hi&quot; &#39;there&#39; &copy; 2024 &hellip;", "&lt;tag&gt; &amp;amp; &#128512;"]:
        assert strip_html(text) == html.unescape(text)


def test_control_characters_and_line_ends():
    raw = "a\x00b\x07c\x1bd\x7fe\x85f\ufeffg\r\nh\ri\tj\u200dk"
    cleaned = clean_text(raw)
    assert cleaned == "abcdefg\nh\ni j\u200dk"  # ZWJ (emoji, Indic scripts) is text, not control
    assert not any(unicodedata.category(c) == "Cc" and c != "\n" for c in cleaned)


def test_unicode_normalisation_matches_unicodedata():
    decomposed = "Cafe\u0301 n\u0303 \uff26\uff55\uff4c\uff4c \ufb01ne x\u00b2 你好，世界！"
    for form in ("NFC", "NFKC"):
        assert clean_text(decomposed, normalization=form) == unicodedata.normalize(form, decomposed)
    assert clean_text(decomposed, normalization="none") == decomposed
    assert "Café" in clean_text(decomposed)  # NFC composes
    assert "Full fine x2" in clean_text(decomposed, normalization="NFKC")  # NFKC folds compatibility forms
    with pytest.raises(ValueError):
        clean_text("x", normalization="NFD")


def test_whitespace_collapses_but_paragraphs_stay():
    text = "  one\u00a0\u00a0two\t\tthree \n\n\n\n  four\u3000five  \n six  "
    assert clean_text(text) == "one two three\n\nfour five\nsix"


def test_real_prose_passes_the_quality_filter():
    config = QualityConfig()
    shakespeare = [p for p in (DATA / "corpus/tinyshakespeare/input.txt").read_text(encoding="utf-8").split("\n\n")
                   if p.strip()]
    pairs = (DATA / "translation/tatoeba-en-zh/cmn.txt").read_text(encoding="utf-8").splitlines()[::20]
    chinese = [line.split("\t")[1] for line in pairs]
    for docs in (shakespeare, chinese):
        kept = sum(quality_reason(clean_text(d), config) is None for d in docs)
        assert kept / len(docs) > 0.99


@pytest.mark.parametrize(("text", "reason"), [
    ("12 34 56 78 90 11 22 33 44 55 66 77 88 99 00 12 34", "letter ratio"),
    ("buy now $$$ ### cheap @@@ deals ~~~ here ^^^", "symbol ratio"),
    ("\n".join(["Click here to subscribe"] * 6 + ["Welcome"]), "repeated lines"),
    ("aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ " * 4, "mean word length"),
])
def test_junk_is_rejected_with_a_reason(text, reason):
    got = quality_reason(text, QualityConfig())
    assert got is not None and got.startswith(reason)
    assert quality_reason(text, QualityConfig(enabled=False)) is None


def test_thresholds_come_from_the_config():
    text = "hello world " * 3 + "1234567"
    ratio = text_stats(text)["letter_ratio"]
    assert quality_reason(text, QualityConfig(min_letter_ratio=ratio - 0.01)) is None
    assert quality_reason(text, QualityConfig(min_letter_ratio=ratio + 0.01)).startswith("letter ratio")
    assert length_ok("abc", QualityConfig(min_chars=3, max_chars=3))
    assert not length_ok("abc", QualityConfig(min_chars=4)) and not length_ok("abc", QualityConfig(max_chars=2))
    # a long Chinese sentence has no spaces: the word-length rule does not apply to it
    chinese = "我们今天晚上一起去看电影吧因为明天是周末而且天气很好" * 3
    assert quality_reason(chinese, QualityConfig(max_mean_word_length=5)) is None
