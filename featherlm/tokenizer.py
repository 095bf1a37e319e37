"""One tokenizer type for every model: a thin wrapper over Hugging Face ``tokenizers`` (Rust).

A ``Tokenizer`` comes from a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``)
or from a GGUF file's vocabulary, which we rebuild into the same ``tokenizers`` pipeline that
llama.cpp and transformers use, so ids match token for token. It also renders chat templates the
way transformers does and decodes streams without cutting multi-byte characters in half.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from featherlm.errors import CheckpointError, ConfigError, DataError, GenerationError
from featherlm.io import atomic_dir, atomic_write_text

# Tokens that end a turn in common chat formats. Generation must stop on them even when the
# checkpoint's single ``eos`` is another token (Llama 3: eos <|end_of_text|>, turns end <|eot_id|>).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<|end_of_text|>")
# Used when a model has no chat template (base models): plain "Role: text" paragraphs, ending
# with "Assistant:" when a reply is wanted. Base models continue such transcripts reasonably.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Split regexes by ``tokenizer.ggml.pre``, as llama.cpp's llama-vocab.cpp applies them. GPT-2's
# own regex is ByteLevel(use_regex=True); the others run as a Split before a regex-free ByteLevel.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}
# llama.cpp splits digits one by one, then applies GPT-2's regex, for these (SmolLM, StarCoder...).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Llama 3's tokenizer.json (and llama.cpp for this pre) emit a word found whole in the vocab as one
# token without running merges.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types; 1 is normal, 6 a <0xAB> byte token


class Tokenizer:
    """Text <-> ids, special ids, chat templates and streaming decode for one model."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, chat_template: str | None = None,
                 config: dict[str, Any] | None = None, source: str = "tokenizer") -> None:
        backend.no_padding()  # a tokenizer.json may carry fixed padding/truncation (sentence-transformers
        backend.no_truncation()  # ship 128); callers pad and truncate explicitly, as transformers does
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.config = dict(config or {})  # other tokenizer_config.json keys, written back by save()
        self.source = source

    # ----- loading -----------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json plus its config files when present."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            found = [n for n in ("tokenizer.model", "vocab.txt", "vocab.json") if (folder / n).exists()]
            extra = f" (found {', '.join(found)}; re-save it with transformers)" if found else ""
            raise CheckpointError(folder, f"no tokenizer.json in this folder{extra}")
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust library raises plain Exception on bad JSON
            raise CheckpointError(folder / "tokenizer.json", f"cannot load tokenizer ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        names = {k: _content(config.get(k) or special.get(k)) for k in _SPECIAL_NAMES}
        managed = (*_SPECIAL_NAMES, "chat_template", "added_tokens_decoder")  # rebuilt by save()
        rest = {k: v for k, v in config.items() if k not in managed}
        tok = cls(backend, **names, chat_template=template, config=rest, source=str(folder))
        if config.get("add_bos_token") and tok.bos_id is not None and tok.bos_id not in tok.encode(""):
            # the flag without a matching post-processor (older transformers rebuilt it at load time)
            tok._ensure_prefix(add_bos=True, add_eos=bool(config.get("add_eos_token")))
        return tok

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], *, source: str = "GGUF tokenizer") -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes from its ``tokenizer.ggml.*`` metadata
        (keys without that prefix, as ``featherlm.checkpoint.gguf.tokenizer_metadata`` gives;
        ``read_gguf_tokenizer(path)`` there does it from a file). ``source`` names the file in errors.

        ``tokenizer.ggml.model`` "gpt2" is byte-level BPE (exact); "llama" is SentencePiece-style
        BPE with byte fallback, merges recovered from scores as transformers does (best effort).
        """
        kind = meta.get("model")
        if kind not in ("gpt2", "llama"):
            raise CheckpointError(source, f"unsupported GGUF tokenizer model {kind!r} (expected gpt2, llama)")
        try:
            backend = _byte_level_bpe(meta) if kind == "gpt2" else _sentencepiece_bpe(meta)
        except Exception as e:  # tokenizers raises plain Exception on inconsistent vocab/merges
            raise CheckpointError(source, f"cannot build the tokenizer from GGUF metadata ({e})") from None
        tokens, names = meta["tokens"], {}
        for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "padding", "unknown"), strict=True):
            index = meta.get(f"{key}_token_id")
            names[name] = tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        tok = cls(backend, **names, chat_template=meta.get("chat_template"), source=source, config=config)
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
        tok._ensure_prefix(add_bos=meta.get("add_bos_token", kind == "llama"),
                           add_eos=meta.get("add_eos_token", False))
        return tok

    def _ensure_prefix(self, *, add_bos: bool, add_eos: bool) -> None:
        """Make ``encode`` add BOS (and EOS) as the model expects, via a template post-processor."""
        add_bos, add_eos = add_bos and self.bos_id is not None, add_eos and self.eos_id is not None
        if not (add_bos or add_eos):
            return

        def seq(name: str, kind: int) -> str:  # "<s>:0 $A:0 </s>:0"
            return " ".join([f"{self.bos_token}:{kind}"] * add_bos + [f"${name}:{kind}"]
                            + [f"{self.eos_token}:{kind}"] * add_eos)

        pairs = ((self.bos_token, add_bos), (self.eos_token, add_eos))
        specials = [(t, self.token_to_id(t)) for t, on in pairs if on]
        self.backend.post_processor = processors.TemplateProcessing(
            single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}", special_tokens=specials)
        self.config.update(add_bos_token=add_bos, add_eos_token=add_eos)

    # ----- ids ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); no padding, every list keeps its length."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding may be larger, never smaller)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def unk_id(self) -> int | None:
        return None if self.unk_token is None else self.token_to_id(self.unk_token)

    @property
    def pad_id(self) -> int | None:
        """The pad id, else EOS: padded positions are masked anyway, any valid id will do."""
        pad = None if self.pad_token is None else self.token_to_id(self.pad_token)
        return pad if pad is not None else self.eos_id

    @property
    def mask_token(self) -> str | None:
        """The masked-LM mask token named in tokenizer_config.json (``mask_token``), if any."""
        return _content(self.config.get("mask_token"))

    @property
    def mask_id(self) -> int | None:
        return None if self.mask_token is None else self.token_to_id(self.mask_token)

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus known end-of-turn tokens this vocabulary marks special."""
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        ids = {self.token_to_id(t) for t in END_OF_TURN if t in special} | {self.eos_id}
        return frozenset(i for i in ids if i is not None)

    # ----- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render a conversation with the model's Jinja template, exactly as transformers does.

        Models without a template use ``PLAIN_CHAT_TEMPLATE``. Extra keyword arguments (tools,
        documents, enable_thinking...) are visible to the template.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise GenerationError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
        try:
            template = _compile(self.chat_template or PLAIN_CHAT_TEMPLATE)
        except jinja2.TemplateSyntaxError as e:
            reason = f"chat template does not parse (line {e.lineno}: {e.message})"
            raise CheckpointError(self.source, reason) from None
        plain = json.loads(json.dumps(messages, default=str))  # the sandbox only ever sees JSON values
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                    "pad_token": self.pad_token}
        try:
            return template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                   **specials, **kwargs)
        except jinja2.TemplateError as e:
            raise GenerationError(f"chat template refused the conversation: {e}") from None

    # ----- streaming and saving ----------------------------------------------------------------
    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json; ``AutoTokenizer.from_pretrained`` reads them."""
        folder = Path(folder)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        for key in _SPECIAL_NAMES:
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(folder / "tokenizer_config.json", text)


class StreamDecoder:
    """Incremental decoding: ``feed`` ids one by one, get only the newly completed text.

    Decodes a short window (``prefix``..end) and emits what it adds beyond the already-emitted
    ``prefix``..``read`` part; text ending in U+FFFD is held back because it is a multi-byte
    character whose remaining bytes are still to come. Decoding the window rather than single
    tokens keeps context-dependent decoders (SentencePiece's leading-space strip, WordPiece's
    ``##``) right. ``feed`` outputs plus ``flush()`` concatenate to ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is emitted context, ids[read:] is pending

    def feed(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(text) <= len(done) or text.endswith("\ufffd") or not text.startswith(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """The held-back rest (an incomplete character at the very end decodes as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


# ----- helpers ---------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"line {e.lineno}: invalid JSON ({e.msg})") from None
    return data if isinstance(data, dict) else {}


def _content(token: Any) -> str | None:
    """A special token as written in HF configs: a string or an AddedToken dict {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    """A template in transformers' environment: sandboxed (templates come from model files)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # jinja's own tojson HTML-escapes; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are spelled in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _added_tokens(meta: dict[str, Any], tokens: list[str], spelled: set[str] | None) -> list[AddedToken]:
    """Control tokens become special, user-defined ones plain added tokens: both match whole."""
    out = []
    for token, kind in zip(tokens, meta.get("token_type") or [1] * len(tokens), strict=True):
        if kind in (CONTROL, USER_DEFINED) and (spelled is None or set(token) <= spelled):
            out.append(AddedToken(token, special=kind == CONTROL, normalized=False))
    # a control token spelled outside the byte alphabet would get a new id past the vocabulary
    return out


def _byte_level_bpe(meta: dict[str, Any]) -> Backend:
    table = _bytes_to_unicode()
    alphabet = set(table.values())
    tokens = [t if set(t) <= alphabet else "".join(table[b] for b in t.encode()) for t in meta["tokens"]]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a few files repeat a token; the first id wins, as in llama.cpp
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges", [])]
    pre = meta.get("pre", "default")
    backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:  # "gpt-2", "default" and unknown: GPT-2's regex, as transformers falls back to
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(_added_tokens(meta, meta["tokens"], alphabet))
    return backend


def _sentencepiece_bpe(meta: dict[str, Any]) -> Backend:
    """Llama/Mistral-style vocab: BPE over '▁'-joined text, bytes as <0xAB> tokens for the rest."""
    tokens = meta["tokens"]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if "merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    else:
        merges = _merges_from_scores(vocab, meta.get("scores") or [0.0] * len(tokens))
    unk = meta.get("unknown_token_id")
    backend = Backend(models.BPE(vocab, merges, unk_token=tokens[unk] if isinstance(unk, int) else None,
                                 fuse_unk=True, byte_fallback=True))
    prefix = meta.get("add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    backend.add_tokens(_added_tokens(meta, tokens, None))
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files keep scores, not merges: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), then by longer pieces,
    ties by vocabulary order. This is transformers' ``generate_merges`` rule."""
    found = []
    for token, index in vocab.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(left, right, scores[index]) for left, right in pairs]
    found.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
    return [(left, right) for left, right, _ in found]


# ----- training --------------------------------------------------------------------------------
TOKENIZER_KINDS = ("bpe", "wordpiece", "unigram", "char")
# Special tokens of each kind by role; they take the first ids in this order. BPE follows GPT-2 (one
# <|endoftext|> as both bos and eos) plus pad and mask, so one vocabulary serves causal and masked LM.
# WordPiece follows BERT; its [CLS]/[SEP] double as bos/eos, the document boundaries the rest of
# featherlm reads from bos/eos. Unigram and char follow SentencePiece's <unk> <s> </s>.
_SPM_ROLES = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "mask_token": "<mask>"}
SPECIAL_ROLES: dict[str, dict[str, str]] = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
            "mask_token": "<|mask|>"},
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]"},
    "unigram": _SPM_ROLES,
    "char": _SPM_ROLES,
}
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def train_tokenizer(files: str | Path | Sequence[str | Path], kind: str, vocab_size: int | None, *,
                    out: str | Path | None = None, special_tokens: Sequence[str] | None = None,
                    min_frequency: int = 2, lowercase: bool | None = None, progress: bool = False) -> Tokenizer:
    """Train a tokenizer on plain-text files (one or more; read line by line) and optionally save it.

    ``kind``: "bpe" (GPT-2 byte-level BPE: every byte is in the vocabulary, so no text is ever
    unknown and ``decode(encode(x)) == x``), "wordpiece" (BERT: normaliser, ``##`` subwords,
    [CLS] x [SEP] added by ``encode``; it splits CJK characters apart and drops whitespace, so
    decoding gives the normalised words joined by spaces; its trainer keeps every character of the
    corpus, so a corpus with more distinct characters than ``vocab_size`` allows gets a larger
    vocabulary), "unigram" (SentencePiece-style with
    ``▁`` for spaces; characters never seen in training become <unk>) or "char" (one id per
    character seen, every one kept regardless of ``min_frequency``; ``vocab_size`` None keeps all).
    ``special_tokens`` are added after the kind's own (see ``SPECIAL_ROLES``). ``lowercase``
    defaults to True for wordpiece (BERT uncased: lowercase and strip accents), else False. With
    ``out`` the folder (tokenizer.json + tokenizer_config.json) is written atomically; an existing
    tokenizer folder is replaced, any other non-empty folder refused.
    """
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r} (choose from {', '.join(TOKENIZER_KINDS)})")
    paths = _training_files(files)
    lowercase = (kind == "wordpiece") if lowercase is None else bool(lowercase)
    roles = SPECIAL_ROLES[kind]
    specials = list(dict.fromkeys([*roles.values(), *(special_tokens or [])]))
    if out is not None:
        _check_out(Path(out))
    if kind == "char":
        counts: Counter[str] = Counter()
        for path in paths:
            for chunk in _read_chunks(path):
                counts.update(chunk)
        return char_tokenizer(counts, vocab_size=vocab_size, special_tokens=special_tokens, lowercase=lowercase,
                              out=out)
    if vocab_size is None or vocab_size <= len(specials):
        raise ConfigError(f"--vocab-size must exceed the {len(specials)} special tokens for a {kind} tokenizer")
    if kind == "bpe" and vocab_size < 256 + len(specials):
        raise ConfigError(f"a byte-level BPE vocabulary holds 256 bytes and {len(specials)} special tokens: "
                          f"--vocab-size must be at least {256 + len(specials)}")
    backend, trainer = _untrained(kind, vocab_size, specials, min_frequency, lowercase, progress)
    try:
        backend.train([str(p) for p in paths], trainer)
    except Exception as e:  # the Rust trainer raises plain Exception (bad UTF-8, too small a vocabulary)
        message = " ".join(str(e).split())
        if "utf-8" in message.lower() or "utf8" in message.lower():
            raise DataError(", ".join(map(str, paths)), None, f"not UTF-8 text ({message})") from None
        if "contain all chars" in message:
            message += " (the corpus has more distinct characters than that: raise --vocab-size)"
        raise ConfigError(f"cannot train a {kind} tokenizer with vocab_size {vocab_size}: {message}") from None
    if kind == "wordpiece":
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return _finish(backend, kind, roles, lowercase, out)


def char_tokenizer(chars: Iterable[str] | Counter[str], *, vocab_size: int | None = None,
                   special_tokens: Sequence[str] | None = None, lowercase: bool = False,
                   out: str | Path | None = None) -> Tokenizer:
    """A character-level tokenizer over ``chars`` (strings whose characters are counted, or a Counter).

    Ids: the special tokens (``SPECIAL_ROLES["char"]`` then ``special_tokens``), then characters
    in code-point order, so the same corpus always gives the same ids. With ``vocab_size`` only the
    most frequent characters are kept and the rest become <unk>.
    """
    counts = chars if isinstance(chars, Counter) else Counter(c for text in chars for c in text)
    if lowercase:
        lowered: Counter[str] = Counter()
        for c, n in counts.items():
            lowered.update({low: n for low in c.lower()})
        counts = lowered
    roles = SPECIAL_ROLES["char"]
    specials = list(dict.fromkeys([*roles.values(), *(special_tokens or [])]))
    kept = [c for c in counts if c not in specials]
    if vocab_size:
        if vocab_size <= len(specials):
            raise ConfigError(f"--vocab-size must exceed the {len(specials)} special tokens")
        kept = sorted(kept, key=lambda c: (-counts[c], c))[: vocab_size - len(specials)]
    vocab = {token: i for i, token in enumerate(specials)}
    for c in sorted(kept):
        vocab.setdefault(c, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token=roles["unk_token"]))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    # one pre-token per code point (newlines too); Fuse joins the characters back without spaces
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if out is not None:
        _check_out(Path(out))
    return _finish(backend, "char", roles, lowercase, out)


def _untrained(kind: str, vocab_size: int, specials: list[str], min_frequency: int, lowercase: bool,
               progress: bool) -> tuple[Backend, Any]:
    """An empty pipeline of ``kind`` and the trainer that fills its model."""
    common = {"vocab_size": vocab_size, "special_tokens": specials, "show_progress": progress}
    if kind == "bpe":
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, bytes
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      **common)
    elif kind == "wordpiece":
        backend = Backend(models.WordPiece(unk_token="[UNK]"))
        # BERT's normaliser: drop control characters, spaces around CJK characters (each one a word),
        # and for uncased vocabularies lowercase + strip accents
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=lowercase, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(min_frequency=min_frequency, continuing_subword_prefix="##", **common)
    else:  # unigram
        backend = Backend(models.Unigram())
        # spaces become ▁ and one ▁ is prepended in the normaliser (as Llama's tokenizer.json does), so
        # a leading space survives: the decoder strips exactly the prepended one. No NFKC here
        # (SentencePiece's default): it rewrites full-width CJK punctuation and the round trip must
        # give the text back; `featherlm data prepare` normalises beforehand instead.
        steps = [normalizers.Lowercase()] if lowercase else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(unk_token="<unk>", initial_alphabet=["\n", "\t"], **common)
    if lowercase and kind == "bpe":
        backend.normalizer = normalizers.Lowercase()
    return backend, trainer


def _finish(backend: Backend, kind: str, roles: dict[str, str], lowercase: bool, out: str | Path | None) -> Tokenizer:
    """Wrap a trained pipeline with its special-token roles, and save it when ``out`` is given."""
    extra = {k: v for k, v in roles.items() if k not in _SPECIAL_NAMES}  # mask, cls, sep
    config = {**extra, "do_lower_case": lowercase, "clean_up_tokenization_spaces": kind == "wordpiece",
              "featherlm_kind": kind}
    names = {k: roles.get(k) for k in _SPECIAL_NAMES}
    tok = Tokenizer(backend, **names, config=config, source=f"trained {kind} tokenizer")
    if out is not None:
        with atomic_dir(out) as tmp:
            tok.save(tmp)
        tok.source = str(out)
    return tok


def _training_files(files: str | Path | Sequence[str | Path]) -> list[Path]:
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    if not paths:
        raise ConfigError("no training files given")
    for path in paths:
        if not path.is_file():
            raise DataError(path, None, "no such file" if not path.exists() else "not a file")
    return paths


def _read_chunks(path: Path, size: int = 1 << 20) -> Iterable[str]:
    """A text file in 1M-character pieces (corpora larger than memory stream through)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while chunk := f.read(size):
                yield chunk
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text (byte {e.start} of a read block)") from None


def _check_out(out: Path) -> None:
    """The output folder may be new, empty, or an earlier tokenizer folder (which is replaced); a folder
    with other files is refused, since the atomic swap would delete them."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    if out.is_dir():
        others = [p.name for p in out.iterdir() if p.name not in _TOKENIZER_FILES]
        if others:
            raise ConfigError(f"{out}: folder is not empty ({', '.join(sorted(others)[:3])}...); "
                              "choose a new folder or an earlier tokenizer folder")
