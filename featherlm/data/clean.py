"""Text cleaning and quality filters for pretraining corpora.

``clean_text`` undoes the usual scraping damage (HTML tags and entities, control characters,
mixed Unicode forms, ragged whitespace) without touching the language of the text.
``quality_reason`` then rejects documents that are mostly not prose, with heuristics that need no
language model or word list (letter share, symbol share, repeated lines, mean word length), so
they hold for Chinese as well as English. Every threshold lives in ``QualityConfig``.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

NORMALIZATIONS = ("NFC", "NFKC", "none")

# Element names of HTML: only these count as tags, so "a<b and c>d" or "List<String>" in prose and
# code survive. Block elements become line breaks (paragraphs must not run together), inline ones vanish.
_BLOCK = ("address article aside blockquote body br dd details dialog div dl dt fieldset figcaption figure "
          "footer form h1 h2 h3 h4 h5 h6 head header hr html li main nav ol p pre section summary table tbody "
          "td tfoot th thead title tr ul").split()
_INLINE = ("a abbr acronym b bdi bdo big button caption center cite code col colgroup data del dfn em font "
           "i iframe img input ins kbd label legend link map mark meta noscript object option picture q rp rt "
           "ruby s samp select small source span strike strong sub sup svg template textarea time tt u var "
           "video wbr audio canvas embed param track area base").split()
_TAG_NAMES = "|".join(sorted(_BLOCK + _INLINE, key=len, reverse=True))
_DROP_BLOCKS = re.compile(r"<(script|style|head)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->|<!DOCTYPE[^>]*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(rf"</?({_TAG_NAMES})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_BLOCK_SET = frozenset(_BLOCK)
# Only text with a closing tag, a <br> or a comment counts as HTML: "if a<b and c>d" is prose (or maths)
_LOOKS_HTML = re.compile(rf"</({_TAG_NAMES})\s*>|<br\s*/?>|<!--|<!DOCTYPE", re.IGNORECASE)
_BREAK = "\ue000"  # a private-use marker where a block tag was; runs of them (and the space around) -> "\n"
_BREAKS = re.compile(r"\s*\ue000[\ue000\s]*")
# C0 and C1 control characters (category Cc) except tab and newline, the byte-order mark and
# U+FFFE/U+FFFF: invisible noise that only wastes token ids.
_CONTROL = {c: None for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0),
                              0xFEFF, 0xFFFE, 0xFFFF)}
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but newline: tabs, NBSP, ideographic space...
_MANY_NEWLINES = re.compile(r"\n{3,}")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")


def strip_html(text: str) -> str:
    """Remove HTML (from text that has a closing tag, <br> or a comment): script/style blocks and
    comments entirely, tags of known elements (a run of block tags leaves one line break), then decode
    entities (``&amp;`` -> ``&``, ``&#20320;`` -> ``你``)."""
    if "<" in text and _LOOKS_HTML.search(text):
        text = _DROP_BLOCKS.sub(_BREAK, text)
        text = _COMMENT.sub("", text)
        text = _TAG.sub(lambda m: _BREAK if m.group(1).lower() in _BLOCK_SET else "", text)
        if _BREAK in text:  # "</li>\n<li>" and the like: one line break, not a paragraph gap each
            text = _BREAKS.sub("\n", text)
    if "&" in text:
        text = html.unescape(text)
    return text


def remove_control(text: str) -> str:
    """Drop control characters (keeping tab and newline); carriage returns become newlines."""
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)


def collapse_whitespace(text: str) -> str:
    """Runs of spaces and tabs (any Unicode space) become one space, lines lose their edge spaces,
    more than one blank line becomes one (paragraphs stay apart), and the ends are stripped."""
    text = _SPACES.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def clean_text(text: str, *, normalization: str = "NFC", html_tags: bool = True, whitespace: bool = True) -> str:
    """The cleaning pipeline: HTML -> control characters -> Unicode normalisation -> whitespace.

    ``normalization``: "NFC" (default: composes accents, changes nothing visible), "NFKC" (also
    folds compatibility forms: full-width letters, ligatures, superscripts; it turns Chinese
    full-width punctuation such as "，" into ASCII ","), or "none".
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if html_tags:
        text = strip_html(text)
    text = remove_control(text)
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    return collapse_whitespace(text) if whitespace else text


# ----- quality --------------------------------------------------------------------------------------
@dataclass
class QualityConfig:
    """Length and quality thresholds; a document failing any of them is dropped.

    The defaults keep ordinary prose in any script, including short lines of dialogue, and reject
    tables of numbers, markup and code dumps, boilerplate repeated line after line, and
    whitespace-free junk (base64, minified code).
    """

    min_chars: int = 1  # documents shorter than this (after cleaning) are dropped as "length"
    max_chars: int | None = None  # and longer ones (None: no limit)
    min_letter_ratio: float = 0.5  # letters (any script) among non-space characters
    max_symbol_ratio: float = 0.2  # symbols (math, currency, emoji, markup characters) among non-space characters
    max_repeated_line_ratio: float = 0.3  # lines that repeat an earlier line of the same document
    min_mean_word_length: float = 1.0  # in characters, over space-separated words ...
    max_mean_word_length: float = 15.0
    word_length_min_words: int = 8  # ... checked only with this many words, and not for scripts
    # written without spaces (Chinese, Japanese, Thai), where a "word" is a whole clause
    enabled: bool = True  # False: only the length limits apply


_MARKUP = frozenset("#*@_|\\{}[]<>~^`=")


def text_stats(text: str) -> dict[str, float]:
    """The measures ``quality_reason`` compares with its thresholds (for reports and tuning)."""
    letters = symbols = spaceless = nonspace = 0
    for ch in text:
        if ch.isspace():
            continue
        nonspace += 1
        cat = unicodedata.category(ch)
        if cat[0] == "L":
            letters += 1
            if cat == "Lo" and _spaceless_script(ch):
                spaceless += 1
        elif cat[0] == "S" or ch in _MARKUP:
            symbols += 1
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    repeated = len(lines) - len(set(lines))
    words = text.split()
    return {
        "letter_ratio": letters / nonspace if nonspace else 0.0,
        "symbol_ratio": symbols / nonspace if nonspace else 0.0,
        "repeated_line_ratio": repeated / len(lines) if lines else 0.0,
        "mean_word_length": sum(map(len, words)) / len(words) if words else 0.0,
        "words": float(len(words)),
        "spaceless_ratio": spaceless / letters if letters else 0.0,
    }


def _spaceless_script(ch: str) -> bool:
    """Han, kana, Hangul syllables (spaced, but long), Thai, Lao, Khmer, Myanmar, Tibetan."""
    cp = ord(ch)
    return (0x2E80 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x3FFFF or 0xAC00 <= cp <= 0xD7AF
            or 0x0E00 <= cp <= 0x0EFF or 0x1780 <= cp <= 0x17FF or 0x1000 <= cp <= 0x109F or 0x0F00 <= cp <= 0x0FFF)


def length_ok(text: str, config: QualityConfig) -> bool:
    return len(text) >= config.min_chars and (config.max_chars is None or len(text) <= config.max_chars)


def quality_reason(text: str, config: QualityConfig) -> str | None:
    """Why ``text`` fails the quality heuristics (a short phrase), or None when it passes."""
    if not config.enabled:
        return None
    s = text_stats(text)
    if s["letter_ratio"] < config.min_letter_ratio:
        return f"letter ratio {s['letter_ratio']:.2f} < {config.min_letter_ratio}"
    if s["symbol_ratio"] > config.max_symbol_ratio:
        return f"symbol ratio {s['symbol_ratio']:.2f} > {config.max_symbol_ratio}"
    if s["repeated_line_ratio"] > config.max_repeated_line_ratio:
        return f"repeated lines {s['repeated_line_ratio']:.2f} > {config.max_repeated_line_ratio}"
    if s["words"] >= config.word_length_min_words and s["spaceless_ratio"] < 0.3:
        if not config.min_mean_word_length <= s["mean_word_length"] <= config.max_mean_word_length:
            return (f"mean word length {s['mean_word_length']:.1f} outside "
                    f"[{config.min_mean_word_length}, {config.max_mean_word_length}]")
    return None
