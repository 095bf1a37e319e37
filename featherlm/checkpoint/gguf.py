"""Read llama.cpp GGUF files as Hugging Face Llama-named float32 tensors plus an HF-style config.

Two parts are our own rather than the ``gguf`` package's, for speed (measured on the 98 MB
SmolLM2-135M Q4_1 file, 2 CPU cores):

* the header parser: ``gguf.GGUFReader`` builds one numpy memmap view per array element, so a
  49k-token vocabulary takes ~3.5 s to parse; ``struct`` over an ``mmap`` takes ~0.15 s and lets
  every error name the metadata key or tensor where a broken file ends;
* dequantisation of the common types (``featherlm.checkpoint.dequant``): ``gguf.quants`` works on
  numpy in groups of 16 rows (~1.7 s for that model); whole-tensor torch ops take ~0.8 s. It runs
  with one torch thread: these element-wise ops gain nothing from more, and OpenMP workers spin-waiting
  on a busy 2-core machine turned a 1 s load into 12 s (measured).
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf
import numpy as np
import torch

from featherlm.checkpoint.dequant import INT4_TYPES, dequantize, int4_blocks
from featherlm.errors import CheckpointError

if TYPE_CHECKING:  # the tokenizer is built on demand (imports flow tokenizer -> checkpoint lazily)
    from featherlm.tokenizer import Tokenizer

# GGUF metadata value type -> struct format (8 = string and 9 = array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
# Architectures whose tensors map onto Llama modules one to one: HF class, and whether llama.cpp's
# converter reordered the rows of q/k for its RoPE layout (Llama family yes, Qwen2 no).
SUPPORTED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class TensorInfo(NamedTuple):
    """Where one tensor lives in the file; ``shape`` is PyTorch order (GGUF lists dims reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class GGUFCheckpoint:
    """A GGUF model as Hugging Face would hold it: ``config.json`` contents and a state dict."""

    path: Path
    architecture: str
    hf_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None  # None when the file has no vocabulary
    tokenizer_meta: dict[str, Any]  # ``tokenizer.ggml.*`` keys without the prefix, + chat_template
    metadata: dict[str, Any] = field(default_factory=dict)  # every other key, e.g. general.name


class _Cursor:
    """Sequential little-endian reads over the file; every overrun becomes a CheckpointError."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.where = buf, path, 0, "the file header"

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise CheckpointError(self.path, f"truncated GGUF file: {self.where} needs bytes up to "
                                             f"{self.pos + n} but the file has {len(self.buf)}")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")  # a few vocabularies hold invalid UTF-8

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise CheckpointError(self.path, f"corrupt GGUF file: {self.where} has value type {vtype}")
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _SCALARS and item_type != 7:  # numeric arrays (token types, scores) in one go
            dtype = np.dtype(_SCALARS[item_type])
            self.need(count * dtype.itemsize)
            out = np.frombuffer(self.buf[self.pos:self.pos + count * dtype.itemsize], dtype).tolist()
            self.pos += count * dtype.itemsize
            return out
        self.need(count)  # every item takes at least a byte; stops absurd counts early
        return [self.value(item_type) for _ in range(count)]


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and the tensor table, without reading tensor data (fast: used for tokenizers)."""
    path = Path(path)
    with _open(path) as buf:
        return _parse_header(buf, path)


def read_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a GGUF file (reads the header alone: ~0.3 s for a 49k vocabulary)."""
    from featherlm.tokenizer import Tokenizer

    meta = tokenizer_metadata(read_gguf_header(path)[0])
    if "model" not in meta:
        raise CheckpointError(path, "GGUF file has no tokenizer (no tokenizer.ggml.model)")
    return Tokenizer.from_gguf(meta, source=str(path))


def _architecture(path: Path, meta: dict) -> str:
    """The file's ``general.architecture``, checked against what featherlm can build."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(path, f"unsupported architecture {arch!r} "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Load a GGUF checkpoint: HF config, float32 state dict in HF Llama names, tokenizer metadata."""
    path = Path(path)
    with _open(path) as buf, _one_thread():
        meta, infos = _parse_header(buf, path)
        arch = _architecture(path, meta)
        if meta.get(f"{arch}.expert_count", 0):
            raise CheckpointError(path, "mixture-of-experts GGUF files are not supported")
        tensors = {t.name: t for t in infos}
        hf_config = _hf_config(path, arch, meta, tensors)
        permute = SUPPORTED_ARCHITECTURES[arch][1]
        state_dict: dict[str, torch.Tensor] = {}
        for info in infos:
            raw = torch.frombuffer(bytearray(buf[info.offset:info.offset + info.n_bytes]), dtype=torch.uint8)
            weight = dequantize(raw, info.ggml_type, info.shape, name=f"{path} (tensor {info.name})")
            if info.name == "rope_freqs.weight":
                hf_config["rope_scaling"] = _llama3_rope_scaling(path, weight, hf_config)
                continue
            kind = info.name.split(".")[-2]
            if permute and kind in ("attn_q", "attn_k"):
                heads = hf_config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
                weight = unpermute_rope(weight, heads)
            state_dict[_hf_name(path, info.name)] = weight
    from featherlm.tokenizer import Tokenizer

    tok_meta = tokenizer_metadata(meta)
    tokenizer = Tokenizer.from_gguf(tok_meta, source=str(path)) if "model" in tok_meta else None
    other = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
    return GGUFCheckpoint(path, arch, hf_config, state_dict, tokenizer, tok_meta, other)


def read_gguf_int4(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The 4-bit matrices of a GGUF file (Q4_0 / Q4_1 / Q4_K) as ``(codes, scale, minimum)`` by HF name.

    ``codes`` (N, K) uint8, ``scale`` and ``minimum`` (N, K/32) float32, with ``scale * codes + minimum``
    equal to the dequantised tensor ``read_gguf`` gives (rows of q/k in HF order, like there).
    """
    path = Path(path)
    out = {}
    with _open(path) as buf, _one_thread():
        meta, infos = _parse_header(buf, path)
        arch = _architecture(path, meta)
        permute = SUPPORTED_ARCHITECTURES[arch][1]
        for info in infos:
            if info.ggml_type not in INT4_TYPES or len(info.shape) != 2:
                continue
            raw = torch.frombuffer(bytearray(buf[info.offset:info.offset + info.n_bytes]), dtype=torch.uint8)
            parts = int4_blocks(raw, info.ggml_type, info.shape, name=f"{path} (tensor {info.name})")
            kind = info.name.split(".")[-2]
            if permute and kind in ("attn_q", "attn_k"):
                key = "attention.head_count" if kind == "attn_q" else "attention.head_count_kv"
                heads = meta.get(f"{arch}.{key}", meta.get(f"{arch}.attention.head_count"))
                parts = tuple(unpermute_rope(t, heads) for t in parts)  # rows move whole: codes and scales alike
            out[_hf_name(path, info.name)] = parts
    return out


def load_int4_linears(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Swap each linear of ``model`` whose GGUF tensor is 4-bit for an ``Int4Linear`` holding the file's
    own codes and scales (no re-quantisation); returns the swapped module names. Other linears (Q6_K,
    Q8_0, F16... in the file) keep their float weights, and so do the embedding table and the output
    layer (``featherlm.model.quant.KEEP_FLOAT``)."""
    from featherlm.checkpoint.hf import hf_to_featherlm
    from featherlm.model.quant import KEEP_FLOAT, Int4Linear, replace_module

    done = []
    with _one_thread():  # packing is element-wise work: see the module docstring
        for hf_name, (codes, scale, minimum) in read_gguf_int4(path).items():
            renamed = hf_to_featherlm({hf_name: codes}, model.config, where=str(path))  # {}: a tied lm_head
            if len(renamed) != 1:
                continue
            module_name = next(iter(renamed)).removesuffix(".weight")
            if module_name in KEEP_FLOAT:
                continue
            module = model.get_submodule(module_name)
            if not isinstance(module, torch.nn.Linear) or tuple(module.weight.shape) != tuple(codes.shape):
                continue  # the embedding table (a lookup, not a matmul)
            layer = Int4Linear(codes, scale, minimum, bias=module.bias).to(module.weight.device)
            replace_module(model, module_name, layer)
            done.append(module_name)
    return done


def tokenizer_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer.ggml.*`` keys without their prefix (tokens, merges, pre...) plus chat_template."""
    tok = {k.removeprefix("tokenizer.ggml."): v for k, v in meta.items() if k.startswith("tokenizer.ggml.")}
    if "tokenizer.chat_template" in meta:
        tok["chat_template"] = meta["tokenizer.chat_template"]
    return tok


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (rotary pairs interleaved) back to HF's (half split).

    llama.cpp stores, per head, rows (0, h/2, 1, h/2+1, ...) where HF has (0, 1, ..., h-1): view
    each head as (h/2, 2) rows and transpose to (2, h/2). Works on weights and biases alike.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _open(path: Path) -> mmap.mmap:
    """mmap the file read-only (the OS pages tensor data in as we go; nothing is copied twice)."""
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if path.is_dir():
        raise CheckpointError(path, "is a folder, expected a .gguf file")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                f.seek(0)
                raise CheckpointError(path, f"not a GGUF file (starts with {f.read(8)!r}, expected b'GGUF')")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(path, f"cannot read file ({e.strerror or e})") from None


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (see the module docstring for why)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _parse_header(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    cur = _Cursor(buf, path)
    cur.pos = 4  # magic checked by _open
    version = cur.scalar("<I")
    if version not in (2, 3):  # v1 used 32-bit counts; a byte-swapped number means big-endian
        raise CheckpointError(path, f"unsupported GGUF version {version} (expected 2 or 3, little-endian)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        cur.where = f"metadata entry {i}"
        key = cur.string()
        cur.where = f"metadata key {key!r}"
        meta[key] = cur.value(cur.scalar("<I"))
    rows = []
    for i in range(n_tensors):
        cur.where = f"tensor table entry {i}"
        name = cur.string()
        cur.where = f"tensor table entry {name!r}"
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        rows.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        raise CheckpointError(path, f"corrupt GGUF file: general.alignment is {align!r}")
    data_start = -(-cur.pos // align) * align
    infos = []
    for name, shape, gtype, offset in rows:
        block, type_size = gguf.GGML_QUANT_SIZES.get(gtype, (0, 0))  # IntEnum keys match ints
        if not block:
            raise CheckpointError(path, f"tensor {name} has unknown GGML type {gtype}")
        info = TensorInfo(name, shape, gtype, data_start + offset, math.prod(shape) // block * type_size)
        if info.offset + info.n_bytes > len(buf):
            raise CheckpointError(path, f"truncated GGUF file: tensor {name} needs bytes up to "
                                        f"{info.offset + info.n_bytes} but the file has {len(buf)}")
        infos.append(info)
    return meta, infos


def _hf_name(path: Path, name: str) -> str:
    parts = name.split(".")  # blk.3.attn_q.weight | token_embd.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise CheckpointError(path, f"unexpected tensor {name!r} for a Llama-style model")


def _hf_config(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """The ``config.json`` the equivalent HF model has; sizes come from tensor shapes where possible."""

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(path, f"GGUF metadata lacks {arch}.{key}")
        return value

    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        if name not in tensors:
            raise CheckpointError(path, f"GGUF file lacks tensor {name}")
    n_head, n_kv = get("attention.head_count"), get("attention.head_count_kv", get("attention.head_count"))
    vocab, hidden = tensors["token_embd.weight"].shape
    q_rows, k_rows = tensors["blk.0.attn_q.weight"].shape[0], tensors["blk.0.attn_k.weight"].shape[0]
    head_dim = q_rows // max(n_head, 1)
    if head_dim % 2 or head_dim * n_head != q_rows or head_dim * n_kv != k_rows:
        raise CheckpointError(path, f"head counts ({n_head} query, {n_kv} key/value) do not match "
                                    f"the q/k shapes ({q_rows} and {k_rows} rows)")
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHITECTURES[arch][0]],
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": get("context_length"),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        config[key] = meta.get(f"tokenizer.ggml.{name}_token_id")
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind != "none":  # linear / yarn, as llama.cpp records them
        config["rope_scaling"] = {"rope_type": kind, "factor": float(get("rope.scaling.factor"))}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            original = get("rope.scaling.original_context_length")
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def _llama3_rope_scaling(path: Path, freqs: torch.Tensor, config: dict[str, Any]) -> dict[str, Any]:
    """Recover Llama 3.x ``rope_scaling`` from the per-frequency factors llama.cpp stores instead.

    The factors are 1 for short wavelengths, ``factor`` for long ones and smooth between; every
    Llama 3.x release uses low/high_freq_factor 1/4 and an 8192 original context, so we rebuild
    the curve from ``factor = max`` and refuse a file whose factors do not match it.
    """
    factor, low, high, orig = float(freqs.max()), 1.0, 4.0, 8192
    dim = config["head_dim"]
    inv = config["rope_theta"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    expect = torch.where(wavelen < orig / high, 1.0, torch.where(wavelen > orig / low, factor,
                         1 / ((1 - smooth) / factor + smooth)))
    if not torch.allclose(expect.float(), freqs, rtol=1e-3):
        raise CheckpointError(path, "rope_freqs.weight does not match Llama 3 RoPE scaling; not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": orig}
