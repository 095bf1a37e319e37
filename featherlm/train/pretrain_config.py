"""The pretraining configuration: nested dataclasses that a YAML recipe mirrors section by section.

    model      arch (gpt | llama | bert | t5 | lstm | gru | rnn | ngram) and its sizes
    data       a text file or a folder of token shards; the tokenizer; the validation split
    objective  causal | mlm (+ nsp) | span; "auto" picks the one of the architecture
    train      optimizer, schedule, batch, evaluation, sampling, time budget, bf16, FSDP
    out        the run directory

Loading is strict (``featherlm.config.from_dict``) and dotted CLI overrides work as for
fine-tuning (``--train.lr 1e-3``); the resolved config (objective filled in) is saved in the run dir.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from featherlm.config import ModelConfig, from_dict, preset
from featherlm.errors import ConfigError
from featherlm.train.config import merge, parse_overrides, read_yaml

TRANSFORMERS = {"gpt": "gpt2", "llama": "llama", "bert": "bert", "t5": "t5"}  # arch -> ModelConfig family
RECURRENT = ("lstm", "gru", "rnn")
TOKENIZER_KINDS = ("auto", "char", "bpe", "wordpiece", "unigram")  # data.tokenizer values that train one
DEFAULT_OBJECTIVE = {"gpt": "causal", "llama": "causal", "bert": "mlm", "t5": "span", "lstm": "causal",
                     "gru": "causal", "rnn": "causal", "ngram": "causal"}


@dataclass
class ModelSection:
    arch: Literal["gpt", "llama", "bert", "t5", "lstm", "gru", "rnn", "ngram"] = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0: n_head (no grouped-query attention)
    d_model: int = 128
    d_ff: int = 0  # 0: 4 * d_model; llama: 8/3 * d_model rounded up to 32 (SwiGLU has three matrices)
    max_seq_len: int = 0  # 0: train.block_size (positions past the block are never trained)
    # bert only, "auto" keeps BERT's own. norm_position "pre": normalise before attention and MLP and end
    # with a norm (as GPT-2 and Llama; Xiong et al. 2020). position "rope": rotary positions instead of a
    # learned table (RoFormer, ModernBERT); a short run cannot afford to learn positions first
    norm_position: Literal["auto", "pre", "post"] = "auto"
    position: Literal["auto", "learned", "rope"] = "auto"
    dropout: float = 0.0  # lstm/gru/rnn only: featherlm's transformer has no dropout layers
    order: int = 5  # ngram: the n of the Kneser-Ney n-gram model


@dataclass
class DataSection:
    train: str = ""  # a UTF-8 text file, or a folder of token shards (featherlm data prepare)
    val: str = ""  # optional: a text file or shard folder; default the shards' val split / the text's tail
    tokenizer: str = "auto"  # a folder, or a kind trained on the training text: auto/char, bpe, wordpiece, unigram
    vocab_size: int = 0  # bpe, wordpiece, unigram: the vocabulary to train (char: 0 keeps every character)
    val_ratio: float = 0.1  # text files without data.val: the last 10% is validation (as nanoGPT)


@dataclass
class ObjectiveSection:
    kind: Literal["auto", "causal", "mlm", "span"] = "auto"  # auto: causal for decoders, mlm bert, span t5
    mask_prob: float = 0.15  # mlm: share of tokens predicted (BERT); 80% [MASK], 10% random, 10% kept
    nsp: bool = False  # mlm: next-sentence prediction on [CLS] (BERT's second task; RoBERTa dropped it)
    noise_density: float = 0.15  # span: share of tokens corrupted (T5)
    mean_span: float = 3.0  # span: mean length of a corrupted span (T5)


@dataclass
class TrainSection:
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine decay ends here (lr / 10, as nanoGPT and Chinchilla)
    warmup_steps: int = 100
    max_steps: int = 2000
    batch_size: int = 12  # global: sequences per optimizer step over all processes and micro-batches
    block_size: int = 64  # tokens per sequence (the model's context)
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    weight_decay: float = 0.1  # AdamW, on matrices only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # 0.99: small batches (nanoGPT's char recipe)
    grad_clip: float = 1.0  # 0 turns clipping off
    bf16: Literal["auto"] | bool = "auto"  # auto: on a GPU with bf16, or a CPU that has it natively
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # CPU threads per process; 0: PyTorch's default (torchrun sets OMP_NUM_THREADS=1)
    seed: int = 0
    eval_every: int = 250  # steps between validation estimates (and `last` checkpoints); 0: at the end only
    eval_iters: int = 20  # batches per validation estimate (the same windows every time)
    sample_every: int = 0  # decoders: steps between generated samples; 0: none
    sample_tokens: int = 200
    sample_prompt: str = "\n"
    log_every: int = 10  # steps between training-loss lines in metrics.jsonl
    time_budget_s: float = 0.0  # > 0: stop cleanly (checkpoint, final eval, model) after this many train.clock seconds
    # of the run (all invocations together: a resumed run continues the same budget; raise it to go on)
    # "steps": warmup, then cosine decay over max_steps (reproducible). "time": the decay runs over
    # time_budget_s instead, so a run ends decayed at the budget however fast the machine is
    # (equal-wall-time comparisons, shared machines); max_steps is then only an upper bound
    schedule: Literal["steps", "time"] = "steps"
    # what time_budget_s and the "time" schedule count: "wall" seconds, or "cpu" seconds of this process
    # (all its threads): with train.threads 1 a CPU second is the same compute however loaded a shared
    # machine is, so runs made one after the other get equal budgets (bench/baselines.py)
    clock: Literal["wall", "cpu"] = "wall"
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)


@dataclass
class OutSection:
    dir: str = "runs/pretrain"
    overwrite: bool = False  # start afresh in a dir that already holds a run (else: error, or resume)
    plot: bool = True  # curves.png


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    train: TrainSection = field(default_factory=TrainSection)
    out: OutSection = field(default_factory=OutSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_transformer(self) -> bool:
        return self.model.arch in TRANSFORMERS

    @property
    def is_decoder(self) -> bool:
        return self.objective.kind == "causal"

    def check(self) -> PretrainConfig:
        """Reject inconsistent values before any work starts; returns self."""
        m, d, o, t = self.model, self.data, self.objective, self.train
        arch, kind = m.arch, o.kind
        problems = [
            (not d.train, "data.train is required (a text file or a folder of token shards)"),
            (kind == "mlm" and arch != "bert", f"objective mlm trains an encoder: use model.arch bert, not {arch}"),
            (kind == "span" and arch != "t5", f"objective span corrupts encoder-decoder inputs: use model.arch t5, "
                                              f"not {arch}"),
            (kind == "causal" and arch in ("bert", "t5"), f"objective causal needs a decoder; {arch} is not one"),
            (o.nsp and kind != "mlm", "objective.nsp goes with objective mlm (BERT)"),
            (not 0 < o.mask_prob < 1, f"objective.mask_prob must be in (0, 1), got {o.mask_prob}"),
            (not 0 < o.noise_density < 1, f"objective.noise_density must be in (0, 1), got {o.noise_density}"),
            (o.mean_span < 1, f"objective.mean_span must be at least 1, got {o.mean_span}"),
            (min(m.n_layer, m.n_head, m.d_model) < 1, "model.n_layer, n_head and d_model must be at least 1"),
            (m.n_kv_head < 0 or m.d_ff < 0 or m.max_seq_len < 0, "model.n_kv_head, d_ff, max_seq_len must be >= 0"),
            (m.dropout and arch in TRANSFORMERS, "model.dropout is for lstm/gru/rnn: featherlm's transformer has no "
                                                 "dropout layers (set 0)"),
            (not 0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}"),
            (m.order < 1, f"model.order must be at least 1, got {m.order}"),
            (m.norm_position != "auto" and arch != "bert", f"model.norm_position is a bert option; {arch} keeps "
                                                            "its family's (set auto)"),
            (m.position != "auto" and arch != "bert", f"model.position is a bert option; {arch} keeps its "
                                                      "family's (set auto)"),
            (m.max_seq_len and m.max_seq_len < t.block_size,
             f"model.max_seq_len {m.max_seq_len} is shorter than train.block_size {t.block_size}"),
            (not 0 <= d.val_ratio < 1, f"data.val_ratio must be in [0, 1), got {d.val_ratio}"),
            (d.tokenizer in ("bpe", "wordpiece", "unigram") and d.vocab_size < 1,
             f"data.tokenizer {d.tokenizer} is trained on the data: set data.vocab_size (e.g. 4000)"),
            (t.lr <= 0 or not 0 <= t.min_lr <= t.lr, f"need 0 < train.lr, 0 <= train.min_lr <= lr; got {t.lr}, "
                                                      f"{t.min_lr}"),
            (t.max_steps < 1, f"train.max_steps must be at least 1, got {t.max_steps}"),
            (t.warmup_steps < 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
            (t.batch_size < 1 or t.grad_accum < 1, "train.batch_size and train.grad_accum must be at least 1"),
            (t.batch_size % t.grad_accum, f"train.batch_size {t.batch_size} is not a multiple of train.grad_accum "
                                          f"{t.grad_accum}"),
            (t.block_size < (8 if kind == "span" else 6 if o.nsp else 4 if kind == "mlm" else 1),
             f"train.block_size {t.block_size} is too short for objective {kind}"),
            (len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas), f"train.betas must be two values in [0, 1), "
                                                                        f"got {t.betas}"),
            (t.grad_clip < 0 or t.weight_decay < 0, "train.grad_clip and train.weight_decay must be >= 0"),
            (t.eval_iters < 1 or t.log_every < 1, "train.eval_iters and train.log_every must be at least 1"),
            (min(t.eval_every, t.sample_every, t.sample_tokens) < 0, "train.eval_every, sample_every, sample_tokens "
                                                                     "must be >= 0"),
            (t.time_budget_s < 0 or t.threads < 0, "train.time_budget_s and train.threads must be >= 0"),
            (t.fsdp and arch not in TRANSFORMERS, f"train.fsdp shards transformer blocks; {arch} has none"),
            (t.schedule == "time" and not t.time_budget_s, "train.schedule time decays over train.time_budget_s: "
                                                           "set it"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
        if arch in TRANSFORMERS:
            self.model_config(vocab_size=2)  # head and width mismatches, an architecture not built yet
        return self

    def model_config(self, vocab_size: int, **special_ids: Any) -> ModelConfig:
        """The ModelConfig of a transformer arch: the family preset with this section's sizes."""
        m = self.model
        family = TRANSFORMERS[m.arch]
        d_ff = m.d_ff or (32 * -(-8 * m.d_model // (3 * 32)) if family == "llama" else 4 * m.d_model)
        sizes = dict(n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head or m.n_head, d_model=m.d_model,
                     d_ff=d_ff, vocab_size=vocab_size, max_seq_len=m.max_seq_len or self.train.block_size)
        if m.norm_position != "auto":  # a pre-LN stack ends with a norm; a post-LN one is normalised already
            sizes.update(norm_position=m.norm_position, final_norm=m.norm_position == "pre")
        if m.position != "auto":
            sizes["position"] = m.position
        try:
            return preset(family, **sizes, **{k: v for k, v in special_ids.items() if v is not None})
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None


def load_pretrain_config(source: PretrainConfig | Mapping[str, Any] | str | Path | None = None,
                         overrides: Sequence[str] | Mapping[str, Any] = ()) -> PretrainConfig:
    """A checked ``PretrainConfig`` from a YAML path, a dict or a config, dotted overrides on top;
    ``objective.kind`` "auto" is resolved to the architecture's objective."""
    where = "pretrain config"
    if isinstance(source, PretrainConfig):
        data = source.to_dict()
    elif isinstance(source, (str, Path)):
        data, where = read_yaml(source), str(source)
    else:
        data = dict(source or {})
    config = from_dict(PretrainConfig, merge(data, parse_overrides(overrides)), where=where)
    if config.objective.kind == "auto":
        config.objective.kind = DEFAULT_OBJECTIVE[config.model.arch]
    return config.check()


def save_pretrain_config(config: PretrainConfig) -> str:
    """The resolved config as YAML text (what the run dir keeps and ``load_pretrain_config`` reads back)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
