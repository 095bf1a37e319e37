"""Recurrent baselines: RNN / LSTM / GRU language models and a BiLSTM text classifier.

The models that transformers replaced, kept small and plain so that a comparison on the same data
and tokenizer is fair: embedding -> dropout -> stacked recurrent layers -> dropout -> output layer,
the output layer tied to the embedding (Press & Wolf 2017; Inan et al. 2017) by default. The LM's
``forward`` takes and returns the recurrent state, so training can run truncated backpropagation
through time over contiguous text (carrying the state from one window to the next) and generation
feeds one token at a time without re-reading the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from featherlm.config import from_dict
from featherlm.errors import CheckpointError, ConfigError
from featherlm.io import atomic_dir

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # (L, B, C), or (h, c) for the LSTM
CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
CONFIG_FILE = "recurrent.json"
EMBED_STD = 0.3  # see RecurrentLM.reset_parameters


@dataclass
class RecurrentConfig:
    """Shape of a recurrent LM. ``d_model`` is both the embedding and the hidden width (needed for
    tied weights); ``dropout`` applies to the embeddings, between layers and before the output."""

    vocab_size: int
    d_model: int = 256
    n_layer: int = 2
    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    dropout: float = 0.1
    tie_weights: bool = True

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"unknown recurrent cell {self.cell!r}; expected one of {', '.join(CELLS)}")
        for name in ("vocab_size", "d_model", "n_layer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "recurrent config") -> RecurrentConfig:
        return from_dict(cls, data, where=where)


@dataclass
class RecurrentOutput:
    """``logits`` (B, T, V) as the transformer's ``ModelOutput`` has them, ``hidden`` (B, T, C) the
    top layer's outputs, ``state`` the recurrent state after the last (real) token of each row."""

    logits: torch.Tensor
    state: State
    hidden: torch.Tensor


def lengths_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row lengths (B,) of a right-padded (B, T) mask; refuses left padding, which would feed the pads
    through the recurrence before the real tokens."""
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("recurrent models take right-padded batches (1s then 0s in attention_mask)")
    return mask.sum(-1).clamp(min=1).cpu()  # pack_padded_sequence wants lengths >= 1, on the CPU


def run_packed(rnn: nn.RNNBase, x: torch.Tensor, attention_mask: torch.Tensor | None,
               state: State | None) -> tuple[torch.Tensor, State]:
    """Run ``rnn`` over x (B, T, C); with padding, pack the rows so each one's final state is taken
    at its last real token and the pads never enter the recurrence (outputs at pads are 0)."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return rnn(x, state)
    packed = pack_padded_sequence(x, lengths_from_mask(attention_mask), batch_first=True, enforce_sorted=False)
    out, state = rnn(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, C * directions)
    return out, state


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): argmax at temperature 0, else sampling (top-k when > 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)


def detach_state(state: State | None) -> State | None:
    """The state cut from the graph: truncated BPTT carries values, not gradients, across windows."""
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class RecurrentLM(nn.Module):
    """An RNN, LSTM or GRU language model with the decoder interface of the transformer's forward."""

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        self.config = config
        c = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, c)
        self.drop = nn.Dropout(config.dropout)
        rnn_dropout = config.dropout if config.n_layer > 1 else 0.0  # PyTorch warns on dropout with one layer
        self.rnn = CELLS[config.cell](c, c, num_layers=config.n_layer, batch_first=True, dropout=rnn_dropout)
        self.lm_head = nn.Linear(c, config.vocab_size)
        if config.tie_weights:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings N(0, EMBED_STD); recurrent weights keep PyTorch's uniform(+-1/sqrt(C)); LSTM
        forget-gate biases start at 1 so that early gradients flow through time (Jozefowicz et al. 2015).

        With Zaremba et al.'s uniform(-0.1, 0.1) (std 0.06) the small LMs here sat on the unigram
        plateau for a hundred steps or more: on Tiny Shakespeare (LSTM, width 128, 200 steps of 16 x 32
        characters) validation loss 2.46 against 2.13 with std 0.3 (2.10 with std 1.0, which gives
        the tied output layer larger first logits; width 256: 2.01 with 0.3, 2.07 with 1.0)."""
        nn.init.normal_(self.embed_tokens.weight, 0.0, EMBED_STD)
        if not self.config.tie_weights:
            nn.init.normal_(self.lm_head.weight, 0.0, EMBED_STD)
        nn.init.zeros_(self.lm_head.bias)
        self.rnn.reset_parameters()
        if self.config.cell == "lstm":
            c = self.config.d_model
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):  # gates i, f, g, o: one bias pair per layer, set f once
                        p[c:2 * c].fill_(1.0)

    def num_params(self) -> int:
        """Distinct parameters (a tied output matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T), right padding only
        state: State | None = None,  # from a previous call: continue the same rows
    ) -> RecurrentOutput:
        x = self.drop(self.embed_tokens(input_ids))  # (B, T, C)
        hidden, state = run_packed(self.rnn, x, attention_mask, state)  # (B, T, C)
        logits = self.lm_head(self.drop(hidden))  # (B, T, V)
        return RecurrentOutput(logits=logits, state=state, hidden=hidden)

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int = 0, seed: int | None = None) -> list[int]:
        """Continue one prompt by ``max_new_tokens`` tokens, reading the prompt once and then feeding
        one token per step with the carried state (no re-reading: the state is the whole history)."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("generation needs a prompt of at least one token")
        device = self.embed_tokens.weight.device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        was_training = self.training
        self.eval()
        out = self(ids[None].to(device))
        logits, state = out.logits[:, -1], out.state  # (1, V)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = sample_logits(logits, temperature, top_k, generator)  # (1,)
            new.append(int(token))
            out = self(token[:, None], state=state)
            logits, state = out.logits[:, -1], out.state
        self.train(was_training)
        return new

    # ------------------------------------------------------------------ saving

    def save(self, folder: str | Path) -> Path:
        """Write ``recurrent.json`` + ``model.safetensors`` (a tied output matrix is stored once)."""
        folder = Path(folder)
        state = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()
                 if not (self.config.tie_weights and k == "lm_head.weight")}
        with atomic_dir(folder) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "featherlm"})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> RecurrentLM:
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(folder, f"not a recurrent LM folder (no {CONFIG_FILE})")
        try:
            config = RecurrentConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")),
                                               where=str(folder / CONFIG_FILE))
        except (json.JSONDecodeError, ConfigError) as e:
            raise CheckpointError(folder / CONFIG_FILE, str(e)) from None
        model = cls(config)
        try:
            state = load_file(str(folder / "model.safetensors"))
            model.load_state_dict(state, strict=not config.tie_weights)
            if config.tie_weights and set(state) != set(model.state_dict()) - {"lm_head.weight"}:
                raise RuntimeError("missing or unexpected tensors")
        except (OSError, RuntimeError) as e:  # safetensors raises its own errors as OSError-like / RuntimeError
            raise CheckpointError(folder / "model.safetensors", f"cannot load weights ({str(e).splitlines()[0]})") \
                from None
        return model.eval()


class BiLSTMClassifier(nn.Module):
    """Bidirectional LSTM over token embeddings, max-pooled over the real tokens, then a linear layer.

    Max pooling over time (not the last states) as in InferSent (Conneau et al. 2017), where it
    beat the other poolings for sentence classification; padding is packed away, so a padded row
    gives the same logits as the row alone.
    """

    def __init__(self, vocab_size: int, num_labels: int, d_model: int = 128, n_layer: int = 1,
                 dropout: float = 0.3, pad_id: int = 0) -> None:
        super().__init__()
        if num_labels < 2:
            raise ConfigError(f"a classifier needs at least 2 labels, got {num_labels}")
        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(d_model, d_model, num_layers=n_layer, batch_first=True, bidirectional=True,
                           dropout=dropout if n_layer > 1 else 0.0)
        self.classifier = nn.Linear(2 * d_model, num_labels)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.drop(self.embed_tokens(input_ids))  # (B, T, C)
        out, _ = run_packed(self.rnn, x, attention_mask, None)  # (B, T, 2C)
        out = out.masked_fill(~attention_mask.bool()[..., None], float("-inf"))
        pooled = out.max(dim=1).values  # (B, 2C)
        return self.classifier(self.drop(pooled))  # (B, L)

