"""SeqGAN-style training: sampling, rewards, the discriminator, one adversarial step, the whole
comparison end to end (tiny budgets) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from featherlm.cli import main
from featherlm.config import preset
from featherlm.errors import ConfigError
from featherlm.model import Transformer
from featherlm.model.baselines import RecurrentConfig, RecurrentLM
from featherlm.tokenizer import char_tokenizer
from featherlm.train.gan import (
    GanConfig,
    advantages,
    bleu,
    discriminator_step,
    generator_step,
    make_discriminator,
    p_real,
    rewards,
    sample,
    self_bleu,
    token_logprobs,
    train_gan,
)

V = 12


def tiny_generator(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("gpt2", vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=32,
                              max_seq_len=32))


def tiny_cfg(**overrides) -> GanConfig:
    base = dict(seq_len=8, prompt_len=2, batch_size=6, d_embed=8, d_filters=8, d_kernel_sizes=(2, 3),
                n_rollouts=2, rollout_stride=3)
    return GanConfig(**{**base, **overrides}).check()


def test_sampling_uses_the_cache_and_logprobs_match_the_sampling_distribution():
    model = tiny_generator()
    prompts = torch.randint(0, V, (4, 3))
    gen = torch.Generator().manual_seed(0)
    samples = sample(model, prompts, 6, generator=gen)
    assert samples.shape == (4, 6) and samples.dtype == torch.long
    assert torch.equal(samples, sample(model, prompts, 6, generator=torch.Generator().manual_seed(0)))
    logp = token_logprobs(model, prompts, samples)  # (B, L), one teacher-forced pass
    full = torch.cat([prompts, samples], dim=1)
    for t in range(6):  # the slow way: a fresh forward per position
        ref = model(full[:, : 3 + t]).logits[:, -1].log_softmax(-1).gather(-1, samples[:, t:t + 1]).squeeze(-1)
        torch.testing.assert_close(logp[:, t], ref, atol=1e-5, rtol=1e-5)
    assert logp.requires_grad
    recurrent = RecurrentLM(RecurrentConfig(V, d_model=8, n_layer=1))
    assert sample(recurrent, prompts, 5).shape == (4, 5)  # the state carries instead of a cache
    with pytest.raises(ConfigError, match="context"):
        sample(model, prompts, 30)


@pytest.mark.parametrize("kind", ["sequence", "rollout"])
def test_rewards_have_one_value_per_token_in_0_1(kind):
    cfg = tiny_cfg(reward=kind)
    model, disc = tiny_generator(), make_discriminator(V, cfg)
    prompts = torch.randint(0, V, (5, 2))
    samples = sample(model, prompts, cfg.seq_len)
    r = rewards(model, disc, prompts, samples, kind=kind, n_rollouts=2, stride=3)
    assert r.shape == (5, cfg.seq_len)
    assert bool(((r >= 0) & (r <= 1)).all())
    torch.testing.assert_close(r[:, -1], p_real(disc, samples))  # the last token's value is D(whole sample)
    if kind == "sequence":
        assert bool((r == r[:, :1]).all())
    else:  # constant within each stride block: positions 0-2, 3-5, 6-7
        assert bool((r[:, :3] == r[:, :1]).all()) and bool((r[:, 6:] == r[:, 7:]).all())


def test_leave_one_out_advantages_sum_to_zero():
    r = torch.rand(7, 5)
    a = advantages(r)
    torch.testing.assert_close(a.sum(0), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0], r[0] - r[1:].mean(0))


def test_discriminator_learns_an_easy_case():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    disc = make_discriminator(V, cfg)
    optimizer = torch.optim.Adam(disc.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def real(n):  # "real" text alternates 1 2 1 2 ...; fakes are uniform noise
        start = torch.randint(0, 2, (n, 1), generator=gen)
        return 1 + (start + torch.arange(cfg.seq_len)) % 2

    def fake(n):
        return torch.randint(0, V, (n, cfg.seq_len), generator=gen)

    test_real, test_fake = real(64), fake(64)
    before = float(((p_real(disc, test_real) > 0.5).sum() + (p_real(disc, test_fake) <= 0.5).sum()) / 128)
    for _ in range(40):
        discriminator_step(disc, optimizer, real(16), fake(16))
    after = float(((p_real(disc, test_real) > 0.5).sum() + (p_real(disc, test_fake) <= 0.5).sum()) / 128)
    assert after > 0.95 and after > before


@pytest.mark.parametrize("kind", ["sequence", "rollout"])
def test_one_generator_step_moves_towards_rewarded_samples(kind):
    cfg = tiny_cfg(reward=kind, g_lr=1e-2)
    model = tiny_generator()
    disc = make_discriminator(V, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.g_lr)
    prompts = torch.randint(0, V, (cfg.batch_size, cfg.prompt_len))
    samples, figures = generator_step(model, optimizer, disc, prompts, cfg, torch.Generator().manual_seed(0))
    assert samples.shape == (cfg.batch_size, cfg.seq_len)
    assert 0 <= figures["reward"] <= 1 and figures["sample_nll"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_policy_gradient_raises_the_probability_of_rewarded_tokens():
    """A fixed 'discriminator' that pays for token 5: REINFORCE must make 5 more likely."""
    cfg = tiny_cfg(g_lr=3e-2, batch_size=16)
    model = tiny_generator()

    class Likes5(torch.nn.Module):
        def forward(self, x):  # (B, L) -> logits (B, 2): "real" in proportion to the share of 5s
            share = (x == 5).float().mean(-1)
            return torch.stack([torch.zeros_like(share), 8 * share - 1], dim=-1)

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.g_lr)
    prompts = torch.zeros(cfg.batch_size, cfg.prompt_len, dtype=torch.long)
    p5 = model(prompts).logits[:, -1].softmax(-1)[:, 5].mean()
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        generator_step(model, optimizer, Likes5(), prompts, cfg, gen)
    assert model(prompts).logits[:, -1].softmax(-1)[:, 5].mean() > 2 * p5


def test_bleu_and_self_bleu_against_sacrebleu_semantics():
    same = ["the cat sat on the mat"] * 4
    assert self_bleu(same) == pytest.approx(100.0)
    diverse = ["the cat sat on the mat", "a dog ran in the park", "birds fly over green hills", "rain fell all day"]
    assert self_bleu(diverse) < 10
    assert bleu(["the cat sat on the mat"], ["a dog ran", "the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["xyz qqq www"], ["the cat sat on the mat"]) < 1


TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 12

TINY = dict(seq_len=8, prompt_len=1, batch_size=4, d_embed=8, d_filters=8, d_kernel_sizes=(2, 3), d_pretrain_steps=2,
            block_size=16, n_layer=1, n_head=2, d_model=16, mle_batch_size=4, eval_samples=6, bleu_refs=6,
            eval_tokens=200, eval_d_samples=8, eval_d_test=8, eval_d_epochs=1, mle_time_s=0.5, adv_time_s=0.5)


def test_train_gan_end_to_end_with_tiny_budgets(tmp_path):
    tokenizer = char_tokenizer([TEXT])
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    split = int(len(ids) * 0.9)
    result = train_gan(ids[:split], ids[split:], tokenizer.vocab_size, decode=tokenizer.decode,
                       cfg=GanConfig(**TINY), out=tmp_path / "gan", tokenizer=tokenizer)
    for branch in ("warm_start", "mle", "gan"):
        figures = result[branch]
        assert figures["val_loss"] > 0 and 0 <= figures["bleu"] <= 100 and 0 <= figures["self_bleu"] <= 100
        assert 0 <= figures["fresh_discriminator_accuracy"] <= 1
    assert result["gan_training"]["g_steps"] >= 1
    assert result["mle_training"]["time_s"] >= 0.5 and result["gan_training"]["time_s"] >= 0.5
    saved = json.loads((tmp_path / "gan" / "result.json").read_text())
    assert saved["gan"]["bleu"] == result["gan"]["bleu"]
    import featherlm

    lm = featherlm.load(tmp_path / "gan" / "generator-gan")  # a normal featherlm folder, char tokenizer included
    assert lm.tokenizer.decode(lm.tokenizer.encode("Speak, speak.")) == "Speak, speak."


def test_gan_cli_json(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    sets = [a for key, value in TINY.items() if key not in ("mle_time_s", "adv_time_s")
            for a in ("--set", f"{key}={','.join(map(str, value)) if isinstance(value, tuple) else value}")]
    argv = ["gan", "--data", str(data), "--out", str(tmp_path / "out"), "--mle-time", "0.5", "--adv-time", "0.5",
            *sets]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert {"warm_start", "mle", "gan", "gan_training"} <= set(result) and result["data"] == str(data)
    assert result["warm_start_training"]["steps"] >= 1 and (tmp_path / "out" / "samples.txt").is_file()
    assert main([*argv, "--set", "nonsense=1", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown key 'nonsense'" in err
