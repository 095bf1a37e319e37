"""SeqGAN-style adversarial training of a decoder after MLE pretraining (Yu et al. 2017).

A discriminator (``TextCNN`` over token ids) learns to tell windows of real text from windows the
generator samples; the generator (any featherlm decoder: a ``Transformer``, or a ``RecurrentLM``)
is then updated by REINFORCE with the discriminator's probability of "real" as its reward,
interleaved with discriminator updates and, by default, with ordinary teacher-forced MLE steps
that keep it from drifting away from the data (as SeqGAN's successors found necessary).

Rewards (``GanConfig.reward``):
- ``"sequence"`` (default): each sample's reward is D(real | whole sample), the same for all its
  tokens; the baseline is the leave-one-out mean reward of the other samples of the batch, so the
  advantages of a batch sum to zero (unbiased, and no value network to train).
- ``"rollout"``: SeqGAN's Monte Carlo search. For every ``rollout_stride``-th prefix length t the
  sample is completed ``n_rollouts`` times by the generator and Q(t) is the mean reward of the
  completions; tokens up to t get Q(t); the baseline is again the leave-one-out mean per position.
  Per-token credit at several times the cost of a step.

``train_gan`` runs the whole comparison the issue asks for: an MLE warm start (or a given model),
then two branches of equal wall time from the same weights, *MLE only* (more teacher forcing) and
*GAN*, both scored by validation perplexity, BLEU of samples against held-out text windows,
self-BLEU among the samples (higher = less diverse) and the accuracy of a fresh discriminator
trained to tell each branch's samples from real text (lower = samples harder to tell apart).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from featherlm.config import preset
from featherlm.errors import ConfigError
from featherlm.io import atomic_write_text
from featherlm.model import Transformer
from featherlm.model.baselines import RecurrentLM, TextCNN
from featherlm.train.baseline import clock_fn

REAL, FAKE = 1, 0  # discriminator labels
MLE_WARMUP = 100  # steps of linear learning-rate warmup of each fresh MLE optimizer


@dataclass
class GanConfig:
    """Every knob of ``train_gan``; the defaults suit character-level Tiny Shakespeare on a CPU."""

    # windows and sampling
    seq_len: int = 64  # tokens per generated sample and per real window the discriminator sees
    prompt_len: int = 1  # real tokens a sample starts from (1: a random real start token)
    batch_size: int = 32
    temperature: float = 1.0  # sampling temperature; the policy gradient uses the same tempered policy
    # adversarial phase
    reward: Literal["sequence", "rollout"] = "sequence"
    n_rollouts: int = 4
    rollout_stride: int = 8
    g_lr: float = 1e-4  # policy-gradient steps (Adam): small, the reward is noisy
    d_lr: float = 1e-3
    d_steps: int = 1  # discriminator updates per generator update
    d_pretrain_steps: int = 50  # discriminator updates before the first generator update
    mle_every: int = 1  # a teacher-forced MLE step after every k-th generator update (0: none)
    adv_time_s: float = 120.0  # seconds of the adversarial phase, and of the MLE-only branch
    clock: Literal["wall", "cpu"] = "wall"  # what the budgets count (cpu: this process's CPU seconds, see clock_fn)
    # the discriminator (TextCNN)
    d_embed: int = 64
    d_filters: int = 64
    d_kernel_sizes: tuple[int, ...] = (2, 3, 4, 5)
    d_dropout: float = 0.25
    # MLE (warm start, MLE steps inside the GAN phase, the MLE-only branch)
    mle_time_s: float = 180.0  # warm start, when no generator is given
    mle_lr: float = 1e-3
    mle_batch_size: int = 32
    block_size: int = 128  # context of the generator built for the warm start, and of MLE windows
    n_layer: int = 4  # the warm-start generator: GPT-2 style, nanoGPT's "baby GPT" widths
    n_head: int = 4
    d_model: int = 128
    # evaluation
    eval_samples: int = 200  # samples for BLEU and self-BLEU
    bleu_refs: int = 200  # held-out windows every sample is scored against
    eval_tokens: int = 50_000  # validation tokens for perplexity (None / 0: all)
    eval_d_samples: int = 512  # samples a fresh discriminator trains on (and as many real windows)
    eval_d_test: int = 256  # held-out samples (and real windows) it is scored on
    eval_d_epochs: int = 3
    seed: int = 0

    def check(self) -> GanConfig:
        if self.reward not in ("sequence", "rollout"):
            raise ConfigError(f"reward must be 'sequence' or 'rollout', got {self.reward!r}")
        for name in ("seq_len", "prompt_len", "batch_size", "n_rollouts", "rollout_stride", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2 (the reward baseline is the other samples' mean)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.adv_time_s < 0 or self.mle_time_s < 0:
            raise ConfigError("time budgets must be >= 0")
        clock_fn(self.clock)
        return self


# ----------------------------------------------------------------------------- sampling and scoring


def context_of(model: nn.Module) -> int:
    """How many positions the generator can attend to (unbounded for recurrent models)."""
    return model.config.max_seq_len if isinstance(model, Transformer) else 1 << 30


@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, n: int, *, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` tokens sampled after each row of prompts (B, P): (B, n). Transformers decode with a KV
    cache, recurrent models with their carried state: one token per forward after the prompt."""
    B, P = prompts.shape
    if P + n > context_of(model):
        raise ConfigError(f"prompt {P} + sample {n} tokens exceed the generator's context of {context_of(model)}")
    was_training = model.training
    model.eval()
    if isinstance(model, RecurrentLM):
        out = model(prompts)
        logits, state = out.logits[:, -1], out.state

        def step(tok: torch.Tensor):  # (B,) -> logits (B, V)
            nonlocal state
            o = model(tok[:, None], state=state)
            state = o.state
            return o.logits[:, -1]
    else:
        cache = model.new_cache(B, P + n)
        logits = model(prompts, cache=cache, last_only=True).logits[:, -1]  # (B, V)

        def step(tok: torch.Tensor):
            return model(tok[:, None], cache=cache, last_only=True).logits[:, -1]
    tokens = []
    for i in range(n):
        probs = (logits.float() / temperature).softmax(-1)  # (B, V)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
        tokens.append(tok)
        if i < n - 1:
            logits = step(tok)
    model.train(was_training)
    return torch.stack(tokens, dim=1)  # (B, n)


def token_logprobs(model: nn.Module, prompts: torch.Tensor, samples: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi(sample_t | prompt, sample_<t) of every sampled token (B, L), with gradients: one
    teacher-forced forward over prompt + sample."""
    P = prompts.shape[1]
    ids = torch.cat([prompts, samples], dim=1)[:, :-1]  # (B, P + L - 1)
    logits = model(ids).logits[:, P - 1:]  # (B, L, V): the predictions of the sampled positions
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, samples[..., None]).squeeze(-1)  # (B, L)


@torch.no_grad()
def p_real(discriminator: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The discriminator's probability that each window (B, L) is real text: (B,)."""
    was_training = discriminator.training
    discriminator.eval()
    p = discriminator(windows).float().softmax(-1)[:, REAL]
    discriminator.train(was_training)
    return p


def rewards(generator: nn.Module, discriminator: nn.Module, prompts: torch.Tensor, samples: torch.Tensor, *,
            kind: str = "sequence", n_rollouts: int = 4, stride: int = 8, temperature: float = 1.0,
            rng: torch.Generator | None = None) -> torch.Tensor:
    """Reward of every sampled token (B, L), in [0, 1], before the baseline (see the module notes)."""
    B, L = samples.shape
    final = p_real(discriminator, samples)  # (B,)
    if kind == "sequence":
        return final[:, None].expand(B, L).clone()
    if kind != "rollout":
        raise ConfigError(f"unknown reward {kind!r}; expected 'sequence' or 'rollout'")
    out = torch.empty(B, L)
    done = 0
    for t in [*range(stride, L, stride), L]:  # prefix lengths whose value is estimated
        if t == L:
            q = final
        else:
            prefix = torch.cat([prompts, samples[:, :t]], dim=1).repeat(n_rollouts, 1)  # (n*B, P + t)
            tails = sample(generator, prefix, L - t, temperature=temperature, generator=rng)  # (n*B, L - t)
            completed = torch.cat([samples[:, :t].repeat(n_rollouts, 1), tails], dim=1)  # (n*B, L)
            q = p_real(discriminator, completed).view(n_rollouts, B).mean(0)  # (B,)
        out[:, done:t] = q[:, None]
        done = t
    return out


def advantages(reward: torch.Tensor) -> torch.Tensor:
    """Rewards (B, L) minus, per position, the mean reward of the *other* rows (leave-one-out): an
    unbiased baseline that needs no value model; a batch's advantages sum to zero per position."""
    B = reward.shape[0]
    return reward - (reward.sum(0, keepdim=True) - reward) / (B - 1)


def policy_gradient_loss(logprobs: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE: -E[A_t log pi(x_t)] over the tokens of the batch."""
    return -(advantage.detach() * logprobs).mean()


# ----------------------------------------------------------------------------- data windows


def random_windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at random offsets of a 1-D id tensor: (n, length)."""
    if data.numel() <= length:
        raise ConfigError(f"{data.numel()} tokens are too few for windows of {length}")
    starts = torch.randint(0, data.numel() - length, (n,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T + 1) window batch (teacher forcing)."""
    logits = model(batch[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def mle_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, cfg: GanConfig,
             gen: torch.Generator, step: int) -> float:
    """One teacher-forced step; ``step`` counts this optimizer's steps, for the warmup: the learning
    rate ramps up over MLE_WARMUP steps of every fresh optimizer (Adam's first moments are noisy)."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.mle_lr * min(1.0, (step + 1) / MLE_WARMUP)
    batch = random_windows(data, cfg.mle_batch_size, cfg.block_size + 1, gen)
    loss = lm_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def mle_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.99))  # nanoGPT's


def mle_train(model: nn.Module, train: torch.Tensor, cfg: GanConfig, time_s: float, *,
              gen: torch.Generator | None = None,
              max_steps: int | None = None, progress: bool = False, desc: str = "mle") -> dict[str, Any]:
    """Teacher-forced training on random windows for ``time_s`` seconds (or ``max_steps``): constant
    learning rate after the warmup, so the MLE-only branch is the warm start run on for longer (with a
    fresh optimizer, like the GAN branch's MLE steps)."""
    gen = gen or torch.Generator().manual_seed(cfg.seed)
    optimizer = mle_optimizer(model, cfg.mle_lr)
    now = clock_fn(cfg.clock)
    model.train()
    step, losses, started, wall = 0, [], now(), time.perf_counter()
    bar = tqdm(total=round(time_s), disable=not progress, unit="s", desc=desc, file=sys.stderr, dynamic_ncols=True)
    while now() - started < time_s and (max_steps is None or step < max_steps):
        losses.append(mle_step(model, optimizer, train, cfg, gen, step))
        step += 1
        bar.update(max(int(now() - started) - bar.n, 0))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    bar.close()
    tail = losses[-50:]
    return {"steps": step, "time_s": round(now() - started, 2), "wall_s": round(time.perf_counter() - wall, 2),
            "train_loss": sum(tail) / len(tail) if tail else math.nan}


# ----------------------------------------------------------------------------- the adversarial phase


def make_discriminator(vocab_size: int, cfg: GanConfig) -> TextCNN:
    return TextCNN(vocab_size, 2, d_embed=cfg.d_embed, kernel_sizes=cfg.d_kernel_sizes, n_filters=cfg.d_filters,
                   dropout=cfg.d_dropout)


def discriminator_step(discriminator: nn.Module, optimizer: torch.optim.Optimizer, real: torch.Tensor,
                       fake: torch.Tensor) -> tuple[float, float]:
    """One update on a balanced batch of real and generated windows; (loss, accuracy) before it."""
    discriminator.train()
    x = torch.cat([real, fake])  # (2B, L)
    y = torch.cat([torch.full((len(real),), REAL), torch.full((len(fake),), FAKE)])
    logits = discriminator(x)  # (2B, 2)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), float((logits.argmax(-1) == y).float().mean())


def generator_step(generator: nn.Module, optimizer: torch.optim.Optimizer, discriminator: nn.Module,
                   prompts: torch.Tensor, cfg: GanConfig, gen: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sample a batch, reward it with the discriminator, take one REINFORCE step. Returns the
    samples (B, L) (reused as the discriminator's negatives) and the step's figures."""
    samples = sample(generator, prompts, cfg.seq_len, temperature=cfg.temperature, generator=gen)
    reward = rewards(generator, discriminator, prompts, samples, kind=cfg.reward, n_rollouts=cfg.n_rollouts,
                     stride=cfg.rollout_stride, temperature=cfg.temperature, rng=gen)  # (B, L)
    generator.train()
    logprobs = token_logprobs(generator, prompts, samples, cfg.temperature)  # (B, L)
    loss = policy_gradient_loss(logprobs, advantages(reward))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(generator.parameters(), 1.0)
    optimizer.step()
    return samples, {"reward": float(reward[:, -1].mean()), "pg_loss": float(loss.detach()),
                     "sample_nll": float(-logprobs.detach().mean())}


def adversarial_train(generator: nn.Module, train: torch.Tensor, vocab_size: int, cfg: GanConfig, *,
                      progress: bool = False) -> tuple[TextCNN, dict[str, Any]]:
    """Discriminator pretraining, then generator / discriminator (/ MLE) steps, all within
    ``cfg.adv_time_s`` seconds. Returns the discriminator and the phase's figures."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    discriminator = make_discriminator(vocab_size, cfg)
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr)
    g_opt = torch.optim.Adam(generator.parameters(), lr=cfg.g_lr)
    m_opt = mle_optimizer(generator, cfg.mle_lr)
    B, L, P = cfg.batch_size, cfg.seq_len, cfg.prompt_len
    now = clock_fn(cfg.clock)
    started, wall = now(), time.perf_counter()
    history: list[dict[str, float]] = []
    d_acc = []
    for _ in range(cfg.d_pretrain_steps):
        if now() - started >= cfg.adv_time_s:
            break
        fake = sample(generator, random_windows(train, B, P, gen), L, temperature=cfg.temperature, generator=gen)
        d_acc.append(discriminator_step(discriminator, d_opt, random_windows(train, B, L, gen), fake)[1])
    pretrain_acc = sum(d_acc[-10:]) / max(len(d_acc[-10:]), 1)
    g_steps = mle_steps = 0
    window: dict[str, list[float]] = {"reward": [], "d_acc": [], "mle_loss": [], "sample_nll": []}
    bar = tqdm(total=round(cfg.adv_time_s), disable=not progress, unit="s", desc="gan", file=sys.stderr,
               dynamic_ncols=True)
    while now() - started < cfg.adv_time_s:
        prompts = random_windows(train, B, P, gen)
        samples, figures = generator_step(generator, g_opt, discriminator, prompts, cfg, gen)
        g_steps += 1
        window["reward"].append(figures["reward"])
        window["sample_nll"].append(figures["sample_nll"])
        for k in range(cfg.d_steps):
            fake = samples if k == 0 else sample(generator, random_windows(train, B, P, gen), L,
                                                 temperature=cfg.temperature, generator=gen)
            window["d_acc"].append(discriminator_step(discriminator, d_opt, random_windows(train, B, L, gen), fake)[1])
        if cfg.mle_every and g_steps % cfg.mle_every == 0:
            window["mle_loss"].append(mle_step(generator, m_opt, train, cfg, gen, mle_steps))
            mle_steps += 1
        bar.update(max(int(now() - started) - bar.n, 0))
        if g_steps % 10 == 0:
            record = {"g_step": g_steps, "time_s": round(now() - started, 2),
                      **{k: sum(v) / len(v) for k, v in window.items() if v}}
            history.append(record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", d_acc=f"{record.get('d_acc', 0):.3f}")
            window = {k: [] for k in window}
    bar.close()
    last = history[-1] if history else {}
    return discriminator, {"g_steps": g_steps, "mle_steps": mle_steps, "d_pretrain_accuracy": pretrain_acc,
                           "final_reward": last.get("reward"), "final_d_accuracy": last.get("d_acc"),
                           "time_s": round(now() - started, 2), "wall_s": round(time.perf_counter() - wall, 2),
                           "history": history}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validation_loss(model: nn.Module, val: torch.Tensor, block_size: int, max_tokens: int | None = None,
                    batch_size: int = 32) -> float:
    """Mean next-token loss over consecutive, non-overlapping windows of ``block_size`` + 1 tokens of
    the validation ids (each token predicted from the window before it, as nanoGPT evaluates)."""
    was_training = model.training
    model.eval()
    data = val[: max_tokens + 1] if max_tokens else val
    n = (data.numel() - 1) // block_size
    if n < 1:
        raise ConfigError(f"{data.numel()} validation tokens are too few for a window of {block_size}")
    windows = torch.stack([data[i * block_size: i * block_size + block_size + 1] for i in range(n)])  # (n, T+1)
    total = 0.0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size]
        total += float(lm_loss(model, batch)) * batch.shape[0]
    model.train(was_training)
    return total / n


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation) of every hypothesis against *all* the references: each
    reference is its own stream shared by every hypothesis, as in Texygen's BLEU for text GANs."""
    import sacrebleu

    streams = [[ref] * len(hypotheses) for ref in references]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def self_bleu(samples: Sequence[str]) -> float:
    """Corpus BLEU of each sample against all the *other* samples (Zhu et al. 2018): 100 means the
    samples repeat each other; lower is more diverse."""
    import sacrebleu

    n = len(samples)
    if n < 2:
        raise ConfigError("self-BLEU needs at least 2 samples")
    streams = [[samples[(i + k) % n] for i in range(n)] for k in range(1, n)]
    return float(sacrebleu.corpus_bleu(list(samples), streams).score)


def sample_pool(model: nn.Module, data: torch.Tensor, n: int, cfg: GanConfig, gen: torch.Generator,
                chunk: int = 128) -> torch.Tensor:
    """``n`` samples (n, seq_len), each after ``prompt_len`` real tokens of ``data``."""
    parts = []
    for start in range(0, n, chunk):
        prompts = random_windows(data, min(chunk, n - start), cfg.prompt_len, gen)
        parts.append(sample(model, prompts, cfg.seq_len, temperature=cfg.temperature, generator=gen))
    return torch.cat(parts)


def fresh_discriminator_accuracy(model: nn.Module, train: torch.Tensor, val: torch.Tensor, vocab_size: int,
                                 cfg: GanConfig) -> float:
    """Accuracy of a new discriminator trained for ``eval_d_epochs`` on ``eval_d_samples`` samples of
    ``model`` against as many real training windows, scored on fresh samples and validation windows
    (balanced). 0.5 means the samples cannot be told from real text; same seed for every model."""
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    torch.manual_seed(cfg.seed + 7)
    fake = sample_pool(model, train, cfg.eval_d_samples, cfg, gen)
    real = random_windows(train, cfg.eval_d_samples, cfg.seq_len, gen)
    discriminator = make_discriminator(vocab_size, cfg)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr)
    B = cfg.batch_size
    for _ in range(cfg.eval_d_epochs):
        order = torch.randperm(len(fake), generator=gen)
        for start in range(0, len(fake), B):
            idx = order[start:start + B]
            discriminator_step(discriminator, optimizer, real[idx], fake[idx])
    test_fake = sample_pool(model, val, cfg.eval_d_test, cfg, gen)
    test_real = random_windows(val, cfg.eval_d_test, cfg.seq_len, gen)
    correct = (p_real(discriminator, test_real) > 0.5).sum() + (p_real(discriminator, test_fake) <= 0.5).sum()
    return float(correct) / (2 * cfg.eval_d_test)


def evaluate_generator(model: nn.Module, train: torch.Tensor, val: torch.Tensor, vocab_size: int,
                       decode: Callable[[list[int]], str], cfg: GanConfig) -> dict[str, Any]:
    """Validation loss / perplexity, BLEU against held-out windows, self-BLEU, fresh-discriminator
    accuracy, and a few samples. The same seeds for every model, so the figures compare."""
    block = min(cfg.block_size, context_of(model))  # windows of block + 1 ids: block inputs
    loss = validation_loss(model, val, block, cfg.eval_tokens or None)
    refs = reference_windows(val, decode, cfg)  # the same for every model
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    samples = [decode(row) for row in sample_pool(model, val, cfg.eval_samples, cfg, gen).tolist()]
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700)),
            "bleu": bleu(samples, refs), "self_bleu": self_bleu(samples),
            "fresh_discriminator_accuracy": fresh_discriminator_accuracy(model, train, val, vocab_size, cfg),
            "samples": samples[:3]}


def reference_windows(val: torch.Tensor, decode: Callable[[list[int]], str], cfg: GanConfig) -> list[str]:
    """The held-out windows BLEU is computed against (seeded: the same for every model)."""
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    return [decode(row) for row in random_windows(val, cfg.bleu_refs, cfg.seq_len, gen).tolist()]


def real_text_reference(val: torch.Tensor, decode: Callable[[list[int]], str], cfg: GanConfig) -> dict[str, float]:
    """BLEU and self-BLEU of held-out *real* windows, scored exactly as samples are (same references):
    the values a perfect generator would get, to read the models' figures against."""
    refs = reference_windows(val, decode, cfg)
    real = [decode(row) for row in random_windows(val, cfg.eval_samples, cfg.seq_len,
                                                  torch.Generator().manual_seed(cfg.seed + 13)).tolist()]
    return {"bleu": bleu(real, refs), "self_bleu": self_bleu(real)}


# ----------------------------------------------------------------------------- the whole comparison


def warm_start_generator(vocab_size: int, cfg: GanConfig) -> Transformer:
    """A small GPT-2-style decoder (nanoGPT's CPU "baby GPT" widths) for the MLE warm start."""
    torch.manual_seed(cfg.seed)
    return Transformer(preset("gpt2", vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_kv_head=cfg.n_head, d_model=cfg.d_model, d_ff=4 * cfg.d_model,
                              max_seq_len=cfg.block_size))


def train_gan(train_ids: Sequence[int] | torch.Tensor, val_ids: Sequence[int] | torch.Tensor, vocab_size: int, *,
              decode: Callable[[list[int]], str], generator: nn.Module | None = None, cfg: GanConfig | None = None,
              out: str | Path | None = None, tokenizer: Any = None, info: dict[str, Any] | None = None,
              progress: bool = False) -> dict[str, Any]:
    """MLE warm start (unless ``generator`` is given), then MLE-only and GAN branches of equal wall
    time from the same weights, each evaluated (see ``evaluate_generator``).

    ``out``: a folder for ``result.json``, ``samples.txt`` and the two generators (featherlm model
    folders, with ``tokenizer`` when given, loadable by ``featherlm.load`` when the generator is a
    Transformer). ``info``: extra fields for the result (where the data came from...). Returns
    ``{"config", "warm_start", "mle", "gan", ...}`` with the figures of each.
    """
    cfg = (cfg or GanConfig()).check()
    train = torch.as_tensor(train_ids, dtype=torch.long).flatten()
    val = torch.as_tensor(val_ids, dtype=torch.long).flatten()
    if max(int(train.max()), int(val.max())) >= vocab_size:
        raise ConfigError(f"token ids reach {max(int(train.max()), int(val.max()))}, beyond the vocabulary of "
                          f"{vocab_size}")
    if generator is not None and context_of(generator) < cfg.block_size:
        cfg = replace(cfg, block_size=context_of(generator))  # MLE windows must fit the given model's context
    if cfg.prompt_len + cfg.seq_len > cfg.block_size:
        raise ConfigError(f"prompt_len + seq_len = {cfg.prompt_len + cfg.seq_len} exceed the generator's context "
                          f"of {cfg.block_size}")
    say = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    result: dict[str, Any] = {**(info or {}), "config": asdict(cfg), "train_tokens": train.numel(),
                              "val_tokens": val.numel()}

    if generator is None:
        generator = warm_start_generator(vocab_size, cfg)
        say(f"MLE warm start: {sum(p.numel() for p in generator.parameters()):,} parameters, {cfg.mle_time_s:.0f} s")
        result["warm_start_training"] = mle_train(generator, train, cfg, cfg.mle_time_s, progress=progress,
                                                  desc="warm start")
    result["generator_params"] = sum(p.numel() for p in generator.parameters())
    warm_state = copy.deepcopy(generator.state_dict())
    result["real_text"] = real_text_reference(val, decode, cfg)
    say("evaluating the warm start")
    result["warm_start"] = evaluate_generator(generator, train, val, vocab_size, decode, cfg)

    # branch 1: MLE only, for the same wall time as the adversarial phase
    mle_model = copy.deepcopy(generator)
    mle_model.load_state_dict(warm_state)
    result["mle_training"] = mle_train(mle_model, train, cfg, cfg.adv_time_s, progress=progress, desc="mle only",
                                       gen=torch.Generator().manual_seed(cfg.seed + 11))
    say("evaluating MLE only")
    result["mle"] = evaluate_generator(mle_model, train, val, vocab_size, decode, cfg)

    # branch 2: adversarial training from the same weights
    gan_model = copy.deepcopy(generator)
    gan_model.load_state_dict(warm_state)
    discriminator, figures = adversarial_train(gan_model, train, vocab_size, cfg, progress=progress)
    result["gan_training"] = figures
    say("evaluating GAN")
    result["gan"] = evaluate_generator(gan_model, train, val, vocab_size, decode, cfg)
    result["gan"]["own_discriminator_accuracy"] = own_accuracy(discriminator, gan_model, val, cfg)

    if out is not None:
        save_outputs(Path(out), result, {"mle": mle_model, "gan": gan_model}, discriminator, tokenizer)
        result["out"] = str(out)
    return result


def own_accuracy(discriminator: nn.Module, generator: nn.Module, val: torch.Tensor, cfg: GanConfig) -> float:
    """The adversarial discriminator's accuracy on fresh samples of the final generator and
    validation windows (balanced)."""
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    fake = sample_pool(generator, val, cfg.eval_d_test, cfg, gen)
    real = random_windows(val, cfg.eval_d_test, cfg.seq_len, gen)
    correct = (p_real(discriminator, real) > 0.5).sum() + (p_real(discriminator, fake) <= 0.5).sum()
    return float(correct) / (2 * cfg.eval_d_test)


def save_outputs(out: Path, result: dict[str, Any], models: dict[str, nn.Module], discriminator: nn.Module,
                 tokenizer: Any) -> None:
    from safetensors.torch import save_file

    from featherlm.checkpoint import save_model
    from featherlm.io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        if isinstance(model, RecurrentLM):
            model.save(out / f"generator-{name}")
        else:
            save_model(model, tokenizer, out / f"generator-{name}")
    with atomic_path(out / "discriminator.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in discriminator.state_dict().items()}, str(tmp))
    lines = []
    for name in ("warm_start", "mle", "gan"):
        lines += [f"== {name} =="] + [s + "\n--" for s in result[name]["samples"]]
    atomic_write_text(out / "samples.txt", "\n".join(lines) + "\n")
    atomic_write_text(out / "result.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def load_generator(path: str | Path) -> tuple[nn.Module, Any]:
    """(decoder, tokenizer) from a featherlm or Hugging Face model folder (``featherlm pretrain`` output,
    ``generator-*`` folders of an earlier GAN run...); the folder must hold a tokenizer."""
    from featherlm.checkpoint import build_model, read_checkpoint
    from featherlm.hub import resolve

    checkpoint = read_checkpoint(resolve(path))
    if not checkpoint.config.causal:
        raise ConfigError(f"{path}: the generator must be a decoder (causal LM), this is an encoder")
    if checkpoint.tokenizer is None:
        raise ConfigError(f"{path}: the generator folder has no tokenizer; the data must be encoded with its own")
    return build_model(checkpoint).train(), checkpoint.tokenizer


def gan_from_file(data: str | Path, *, generator: str | Path | None = None, out: str | Path | None = None,
                  cfg: GanConfig | None = None, val_fraction: float = 0.1, progress: bool = False) -> dict[str, Any]:
    """``train_gan`` on a text file: the generator's tokenizer when ``generator`` is given, else
    characters (and a warm start trained here); the last ``val_fraction`` of the tokens for validation."""
    from featherlm.train.baseline import encode_text, read_text, split_ids

    text = read_text(data)
    model = None
    if generator is not None:
        model, tokenizer = load_generator(generator)
        ids = tokenizer.encode(text, add_special_tokens=False)
        vocab_size, decode = model.config.vocab_size, tokenizer.decode
    else:
        ids, vocab_size, decode, tokenizer = encode_text(text, "char")
    train_ids, val_ids = split_ids(ids, val_fraction)
    result = train_gan(train_ids, val_ids, vocab_size, decode=decode, generator=model, cfg=cfg, out=out,
                       tokenizer=tokenizer, progress=progress,
                       info={"data": str(data), "generator": str(generator) if generator is not None else None})
    return result
