"""Hugging Face folders: config.json <-> ModelConfig and weight name maps per family.

Reading accepts ``model.safetensors`` or a sharded ``model.safetensors.index.json``. The name maps
are explicit tables (as in nanoGPT's GPT-2 loader): HF name pattern -> featherlm name, with the
layer number as ``{}``. GPT-2's fused ``c_attn`` and its Conv1D (in, out) weights are the only
places where tensors change shape. T5 keeps one embedding table (``shared``) for encoder, decoder
and (when tied) output; featherlm's names hold it as ``encoder.embed_tokens`` and its alias.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from featherlm.config import ModelConfig
from featherlm.errors import CheckpointError, ConfigError

# ----------------------------------------------------------------------------- configs

ACTIVATION_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
LLAMA_LIKE = ("llama", "mistral", "qwen2", "smollm3")
T5_LIKE = ("t5", "mt5")  # mT5 is T5 v1.1 with a bigger vocabulary


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Translate a transformers config dict into a ModelConfig; unknown model types are an error."""
    kind = hf.get("model_type")
    try:
        if kind in LLAMA_LIKE:
            n_head = hf["num_attention_heads"]
            return ModelConfig(
                family="llama", n_layer=hf["num_hidden_layers"], n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=hf["hidden_size"],
                d_ff=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048),
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 1e4))),
                rope_scaling=_rope_scaling(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                activation=ACTIVATION_FROM_HF[hf.get("hidden_act", "silu")],
                attn_bias=bool(hf.get("attention_bias", kind == "qwen2")), mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
            )
        if kind == "gpt2":
            return ModelConfig(
                family="gpt2", n_layer=hf["n_layer"], n_head=hf["n_head"], n_kv_head=hf["n_head"],
                d_model=hf["n_embd"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"], vocab_size=hf["vocab_size"],
                max_seq_len=hf["n_positions"], norm="layernorm", mlp="plain",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=ACTIVATION_FROM_HF[hf.get("activation_function", "gelu_new")], position="learned",
                attn_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        if kind == "bert":
            if hf.get("position_embedding_type", "absolute") != "absolute":
                raise CheckpointError(where, "only absolute position embeddings are supported for BERT")
            return ModelConfig(
                family="bert", n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                n_kv_head=hf["num_attention_heads"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"], causal=False,
                norm="layernorm", norm_position="post", mlp="plain", activation=ACTIVATION_FROM_HF[hf["hidden_act"]],
                position="learned", attn_bias=True, o_bias=True, mlp_bias=True,
                type_vocab_size=hf.get("type_vocab_size", 2), embed_norm=True, final_norm=False, pooler=True,
                norm_eps=hf.get("layer_norm_eps", 1e-12), pad_token_id=hf.get("pad_token_id", 0),
            )
        if kind in T5_LIKE:
            return _t5_config(hf, where)
    except KeyError as e:
        raise CheckpointError(where, f"missing field {e.args[0]!r} for model_type {kind!r}") from None
    raise CheckpointError(where, f"unsupported architecture: model_type {kind!r} (supported: "
                                 f"{', '.join(LLAMA_LIKE)}, gpt2, bert, {', '.join(T5_LIKE)})")


def _t5_config(hf: dict, where: str) -> ModelConfig:
    """T5, T5 v1.1, flan-t5, mT5. ``feed_forward_proj`` is "relu" or "gated-gelu" ("gated-" + any
    activation). Tying: transformers 4 ties and rescales the output together (``tie_word_embeddings``);
    transformers 5 writes ``scale_decoder_outputs`` apart, and unties when the weights hold a distinct
    ``lm_head`` (``untie_t5`` does that here, once the weights are read)."""
    proj = hf.get("feed_forward_proj", "relu")
    gated, _, act = proj.rpartition("-")
    if gated not in ("", "gated") or (act if proj != "gated-gelu" else "gelu_new") not in ACTIVATION_FROM_HF:
        raise CheckpointError(where, f"unsupported T5 feed_forward_proj {proj!r} (expected relu, gated-gelu, ...)")
    tied = bool(hf.get("tie_word_embeddings", True))
    pad = hf.get("pad_token_id", 0)
    return ModelConfig(
        family="t5", encoder_decoder=True, n_layer=hf["num_layers"],
        n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
        n_kv_head=hf["num_heads"], d_model=hf["d_model"], head_dim=hf["d_kv"], d_ff=hf["d_ff"],
        vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", 512), position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        mlp="gated" if gated else "plain", activation=ACTIVATION_FROM_HF["gelu_new" if proj == "gated-gelu" else act],
        attn_scale=False, tie_embeddings=tied, scale_output=bool(hf.get("scale_decoder_outputs", tied)),
        initializer_range=hf.get("initializer_factor", 1.0), pad_token_id=pad, eos_token_id=hf.get("eos_token_id", 1),
        decoder_start_token_id=hf.get("decoder_start_token_id", pad),
    )


def untie_t5(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> ModelConfig:
    """A T5 config whose weights carry an ``lm_head`` different from ``shared`` is untied, whatever the
    config says (transformers 5 forces tie_word_embeddings=True in T5 configs and decides so too)."""
    head, shared = hf_state.get("lm_head.weight"), hf_state.get("shared.weight")
    if cfg.family != "t5" or not cfg.tie_embeddings or head is None or shared is None or torch.equal(head, shared):
        return cfg
    return dataclasses.replace(cfg, tie_embeddings=False)


def _rope_scaling(hf: dict) -> dict | None:
    """RoPE scaling from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5, which
    keeps the scaling there next to rope_theta); None for plain RoPE."""
    if hf.get("rope_scaling"):
        return hf["rope_scaling"]
    params = {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"}
    return params if params.get("rope_type", params.get("type", "default")) != "default" else None


def config_to_hf(cfg: ModelConfig) -> dict:
    """The transformers config.json for a ModelConfig (export)."""
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    if cfg.family == "t5":
        act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation)
        if cfg.mlp == "gated" and act in ("gelu_new", "gelu"):
            if act == "gelu":  # transformers reads "gated-gelu" as the tanh approximation
                raise ConfigError("a gated T5 MLP with exact GELU has no transformers equivalent (use gelu_tanh)")
            proj = "gated-gelu"
        else:
            proj = ("gated-" if cfg.mlp == "gated" else "") + act
        return dict(
            architectures=["T5ForConditionalGeneration"], model_type="t5", d_model=cfg.d_model, d_kv=cfg.head_dim,
            d_ff=cfg.d_ff, num_layers=cfg.n_layer, num_decoder_layers=cfg.n_decoder_layer, num_heads=cfg.n_head,
            relative_attention_num_buckets=cfg.relative_buckets,
            relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
            feed_forward_proj=proj, tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.scale_output,
            initializer_factor=cfg.initializer_range, vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
            is_encoder_decoder=True, decoder_start_token_id=cfg.decoder_start_token_id, torch_dtype="float32",
            **{k: v for k, v in ids.items() if v is not None},
        )
    if cfg.family == "llama":
        act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation)
        return dict(
            architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
            rms_norm_eps=cfg.norm_eps, hidden_act=act, attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias,
            tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32", **ids,
        )
    if cfg.family == "gpt2":
        act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation)
        return dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.d_model, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, vocab_size=cfg.vocab_size,
            layer_norm_epsilon=cfg.norm_eps, activation_function=act, tie_word_embeddings=cfg.tie_embeddings,
            torch_dtype="float32", **ids,
        )
    return dict(
        architectures=["BertModel"], model_type="bert", hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len, hidden_act=cfg.activation, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute", torch_dtype="float32",
        pad_token_id=cfg.pad_token_id or 0,
    )


# ----------------------------------------------------------------------------- name maps

# HF name (after stripping the family's prefix) -> featherlm name; "{}" is the layer number.
LLAMA_NAMES = {
    "embed_tokens.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"layers.{{}}.{p}": f"layers.{{}}.{p}" for p in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight")},
}
GPT2_NAMES = {
    "wte.weight": "embed_tokens.weight", "wpe.weight": "embed_positions.weight",
    "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias", "lm_head.weight": "lm_head.weight",
    "h.{}.ln_1.weight": "layers.{}.input_layernorm.weight", "h.{}.ln_1.bias": "layers.{}.input_layernorm.bias",
    "h.{}.ln_2.weight": "layers.{}.post_attention_layernorm.weight",
    "h.{}.ln_2.bias": "layers.{}.post_attention_layernorm.bias",
    "h.{}.attn.c_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "h.{}.attn.c_proj.bias": "layers.{}.self_attn.o_proj.bias",
    "h.{}.mlp.c_fc.weight": "layers.{}.mlp.up_proj.weight", "h.{}.mlp.c_fc.bias": "layers.{}.mlp.up_proj.bias",
    "h.{}.mlp.c_proj.weight": "layers.{}.mlp.down_proj.weight",
    "h.{}.mlp.c_proj.bias": "layers.{}.mlp.down_proj.bias",
    # c_attn is fused q|k|v and handled in hf_to_featherlm / featherlm_to_hf
}
GPT2_QKV = ("q_proj", "k_proj", "v_proj")
GPT2_CONV1D = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out): transpose
BERT_NAMES = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "embeddings.position_embeddings.weight": "embed_positions.weight",
    "embeddings.token_type_embeddings.weight": "embed_token_types.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight", "embeddings.LayerNorm.bias": "embed_norm.bias",
    "pooler.dense.weight": "pooler.dense.weight", "pooler.dense.bias": "pooler.dense.bias",
}
for _hf, _ours in {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
                   "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.o_proj",
                   "attention.output.LayerNorm": "post_attention_layernorm", "intermediate.dense": "mlp.up_proj",
                   "output.dense": "mlp.down_proj", "output.LayerNorm": "post_mlp_layernorm"}.items():
    for _p in ("weight", "bias"):
        BERT_NAMES[f"encoder.layer.{{}}.{_hf}.{_p}"] = f"layers.{{}}.{_ours}.{_p}"

# T5: "encoder.block.N.layer.0.SelfAttention.q" etc. Layer 0 is self-attention in both stacks; the
# decoder's layer 1 is cross-attention (EncDecAttention), so its MLP is layer 2 (the encoder's: 1).
# Only block 0 holds the relative position bias (featherlm keeps it on the stack, where it is used).
T5_NAMES = {
    "shared.weight": "encoder.embed_tokens.weight",
    "encoder.embed_tokens.weight": "encoder.embed_tokens.weight",  # aliases of `shared` that some files hold
    "decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
    "lm_head.weight": "decoder.lm_head.weight",
}
for _stack, _mlp in (("encoder", 1), ("decoder", 2)):
    T5_NAMES[f"{_stack}.final_layer_norm.weight"] = f"{_stack}.norm.weight"
    T5_NAMES[f"{_stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
        f"{_stack}.relative_attention_bias.weight"
    _layers = {"layer.0.layer_norm": "input_layernorm", f"layer.{_mlp}.layer_norm": "post_attention_layernorm",
               **{f"layer.0.SelfAttention.{p}": f"self_attn.{p}_proj" for p in "qkvo"},
               f"layer.{_mlp}.DenseReluDense.wi": "mlp.up_proj", f"layer.{_mlp}.DenseReluDense.wi_0": "mlp.gate_proj",
               f"layer.{_mlp}.DenseReluDense.wi_1": "mlp.up_proj", f"layer.{_mlp}.DenseReluDense.wo": "mlp.down_proj"}
    if _stack == "decoder":
        _layers["layer.1.layer_norm"] = "cross_attn_layernorm"
        _layers.update({f"layer.1.EncDecAttention.{p}": f"cross_attn.{p}_proj" for p in "qkvo"})
    for _hf, _ours in _layers.items():
        T5_NAMES[f"{_stack}.block.{{}}.{_hf}.weight"] = f"{_stack}.layers.{{}}.{_ours}.weight"

NAME_MAPS = {"llama": LLAMA_NAMES, "gpt2": GPT2_NAMES, "bert": BERT_NAMES, "t5": T5_NAMES}
PREFIXES = {"llama": ("model.",), "gpt2": ("transformer.",), "bert": ("bert.",), "t5": ()}


def reverse_names(cfg: ModelConfig) -> dict[str, str]:
    """featherlm name (pattern) -> HF name. Where several HF names map to one of ours, the one to write:
    T5's ``shared`` (not its aliases), and the MLP's ``wi`` (plain) or ``wi_1`` (gated)."""
    reverse = {v: k for k, v in NAME_MAPS[cfg.family].items()}
    if cfg.family == "t5":
        reverse["encoder.embed_tokens.weight"] = "shared.weight"
        for stack, mlp in (("encoder", 1), ("decoder", 2)):
            wi = "wi_1" if cfg.mlp == "gated" else "wi"
            hf = f"{stack}.block.{{}}.layer.{mlp}.DenseReluDense.{wi}.weight"
            reverse[f"{stack}.layers.{{}}.mlp.up_proj.weight"] = hf
    return reverse


# Buffers and heads that HF files carry but featherlm does not use (yet): skipped, not an error.
IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$|^(cls|classifier|score)\.")
LAYER = re.compile(r"\.(\d+)\.")


def _pattern(name: str) -> tuple[str, str | None]:
    m = LAYER.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


def hf_to_featherlm(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "checkpoint") -> dict:
    """Rename (and for GPT-2 split/transpose) an HF state dict into featherlm's names."""
    names, prefixes = NAME_MAPS[cfg.family], PREFIXES[cfg.family]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        pattern, layer = _pattern(name)
        if name in names:  # an exact name (T5's block-0 position bias) before the per-layer patterns
            pattern, layer = name, None
        if cfg.family == "gpt2" and any(pattern.endswith(s + ".weight") for s in GPT2_CONV1D):
            tensor = tensor.t()
        if cfg.family == "gpt2" and pattern.startswith("h.{}.attn.c_attn."):
            kind = pattern.rsplit(".", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[f"layers.{layer}.self_attn.{proj}.{kind}"] = part.contiguous()
            continue
        target = names.get(pattern)
        if target is None:
            if not IGNORED.search(name):
                unknown.append(name)
            continue
        out[target.format(layer) if layer is not None else target] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise CheckpointError(where, f"unexpected weights for a {cfg.family} model: {shown}")
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
        out.pop("decoder.lm_head.weight", None)
    return out


def featherlm_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_featherlm, giving names ``transformers`` loads into its *ForCausalLM / BertModel."""
    reverse = reverse_names(cfg)
    prefix = {"llama": "model.", "gpt2": "transformer.", "bert": "", "t5": ""}[cfg.family]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        pattern, layer = _pattern(name)
        if cfg.family == "gpt2" and pattern.split(".")[-2] in GPT2_QKV:
            continue  # fused into c_attn below
        if cfg.family == "t5" and name == "decoder.embed_tokens.weight":
            continue  # the alias of `shared`
        if name in reverse:
            pattern, layer = name, None
        hf = reverse[pattern]
        hf = hf.format(layer) if layer is not None else hf
        if cfg.family == "gpt2" and any(hf.endswith(s + ".weight") for s in GPT2_CONV1D):
            tensor = tensor.t()
        out[hf if hf == "lm_head.weight" else prefix + hf] = tensor.contiguous()
    if cfg.family == "gpt2":
        for i in range(cfg.n_layer):
            for kind in ("weight", "bias"):
                parts = [state[f"layers.{i}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
                fused = torch.cat(parts, dim=0)
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = (fused.t() if kind == "weight" else fused).contiguous()
    return out


# ----------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"line {e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, binary junk
        raise CheckpointError(path, f"cannot read ({type(e).__name__}: {e})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load one safetensors file, checking first that the header and data are complete."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(path, f"truncated safetensors file: header needs {8 + n} bytes, file has {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise CheckpointError(path, f"truncated safetensors file: tensor data needs {8 + n + end} bytes, "
                                        f"file has {size}")
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except Exception as e:  # safetensors raises its own error types on corrupt data
        raise CheckpointError(path, f"not a readable safetensors file ({e})") from None


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of a folder: ``model.safetensors``, a sharded index, or the folder's one *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in read_json(index).get("weight_map", {}).values()})
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        has_bin = any(folder.glob("*.bin"))
        reason = "only PyTorch .bin weights (pickles are not loaded; convert to safetensors)" if has_bin else \
            "no *.safetensors weights"
        raise CheckpointError(folder, reason)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    return state, files
