"""One matrix over every PEFT method on tiny random Llama (GQA) and BERT models.

For each method: the adapted model starts as the base model (prefix/prompt change outputs by design),
only the method's parameters train and get gradients, a few AdamW steps lower a loss, merging keeps
the outputs and unmerging restores the base weights exactly, files round-trip, the base checkpoint
still loads, and cached generation equals uncached generation.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from featherlm import peft
from featherlm.errors import CheckpointError, ConfigError
from featherlm.generate import GenerationConfig, generate_ids
from featherlm.peft import PeftConfig

METHODS = list(peft.METHODS)
FAMILIES = ["llama", "bert"]
CASES = [(f, m) for f in FAMILIES for m in METHODS]
SAVE = {"llama": "lm_head", "bert": "pooler"}  # a module outside the blocks for freeze's modules_to_save
CHANGES_OUTPUT = {"prefix", "prompt"}  # prompt-style methods add inputs: outputs differ from the start
MERGING = {"lora", "dora", "ia3", "bitfit", "full", "freeze"}  # merged model == plain modules only
# the last name part of every parameter that trains, per method (bitfit: per family, see below)
TRAINED = {"lora": {"adapter_A", "adapter_B"}, "dora": {"adapter_A", "adapter_B", "adapter_magnitude"},
           "ia3": {"adapter_scale"}, "prefix": {"adapter_key", "adapter_value"}, "prompt": {"adapter_prompt"},
           "adapter": {"adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias"}}


def config_for(method: str, family: str, **overrides) -> PeftConfig:
    extra = {"freeze": dict(freeze="top:1", modules_to_save=[SAVE[family]])}.get(method, {})
    return PeftConfig(**{"method": method, "r": 4, "adapter_size": 8, "num_virtual_tokens": 3, **extra, **overrides})


def ids_for(seed: int = 0, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def output(model, ids: torch.Tensor) -> torch.Tensor:
    """What the tests compare: logits of a decoder, hidden states plus pooled output of an encoder."""
    out = model(ids)
    return out.logits if out.logits is not None else torch.cat([out.hidden, out.pooled[:, None]], dim=1)


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy for decoders; for BERT, predict each sequence's last token from the
    pooled [CLS] through the (frozen) embedding matrix, so that the pooler and every block matter."""
    out = model(ids)
    if out.logits is not None:
        return torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    logits = out.pooled @ model.embed_tokens.weight.T  # (B, V)
    return torch.nn.functional.cross_entropy(logits, ids[:, -1])


def perturb_(model, seed: int = 1) -> None:
    """Move every trainable parameter off its initial value, as training would (B = 0 hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft.adapter_state_dict(model).items()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture
def adapted(tiny_model):
    """Factory: (base, adapted) for a family and method; the adapted one is a deep copy."""

    def make(family: str, method: str, **overrides):
        base = tiny_model(family, seed=3)
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        peft.apply(model, config_for(method, family, **overrides))
        return base, model

    return make


@pytest.mark.parametrize("family,method", CASES)
def test_starts_as_the_base_model(adapted, family, method):
    base, model = adapted(family, method)
    ids = ids_for()
    with torch.no_grad():
        diff = (output(model, ids) - output(base, ids)).abs().max().item()
    if method in CHANGES_OUTPUT:
        assert diff > 1e-3  # the virtual tokens / prefixes are attended to from the first step
    else:
        assert diff < 1e-5


@pytest.mark.parametrize("family,method", CASES)
def test_only_the_method_parameters_train(adapted, family, method):
    base, model = adapted(family, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {n.rsplit(".", 1)[-1] for n in trainable}
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    elif method == "freeze":
        assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("layers.1.", SAVE[family]))}
    elif method == "bitfit":  # BERT has biases to train; Llama has none, so zero-init ones are added
        assert kinds == ({"bias"} if family == "bert" else {"adapter_bias"})
    else:
        assert kinds == TRAINED[method]
    assert sorted(trainable) == sorted(peft.adapter_state_dict(model))
    n_trainable, n_total = peft.count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters())
    if method != "full":
        assert n_trainable < n_total / 2

    loss_of(model, ids_for()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if n in trainable) > 0


@pytest.mark.parametrize("family,method", CASES)
def test_a_few_steps_lower_the_loss(adapted, family, method):
    _, model = adapted(family, method)
    ids = ids_for(batch=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = loss_of(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family,method", CASES)
def test_merged_equals_unmerged(adapted, family, method):
    base, model = adapted(family, method)
    perturb_(model)
    ids = ids_for()
    with torch.no_grad():
        before = output(model, ids)
        merged = peft.merge(copy.deepcopy(model))
        assert torch.allclose(output(merged, ids), before, atol=1e-5)
    left = [type(m).__name__ for m in merged.modules() if isinstance(m, peft.AdaptedLinear)]
    left += [h for m in merged.modules() for h in peft.HOOKS if getattr(m, h, None) is not None]
    assert (left == []) == (method in MERGING), left  # adapter, prefix and prompt cannot merge


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_in_place_and_unmerge_restore_the_base_weights_exactly(adapted, method):
    base, model = adapted("llama", method, target_modules=["q_proj", "v_proj", "down_proj"])
    perturb_(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids = ids_for()
    with torch.no_grad():
        before = output(model, ids)
        peft.merge_(model)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
        assert changed and all(k.endswith(".weight") for k in changed)
        assert torch.allclose(output(model, ids), before, atol=1e-5)  # the adapter is not counted twice
        peft.unmerge_(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(output(model, ids), before)


@pytest.mark.parametrize("family,method", CASES)
def test_save_and_load_round_trip(adapted, tiny_model, tmp_path, family, method):
    base, model = adapted(family, method)
    perturb_(model)
    peft.save_adapter(model, model.peft_state.config, tmp_path / "adapter")
    fresh = tiny_model(family, seed=3)
    config = peft.load_adapter(fresh, tmp_path / "adapter")
    assert config.method == method
    ids = ids_for()
    with torch.no_grad():
        assert torch.allclose(output(fresh, ids), output(model, ids), atol=1e-6)
    # the file holds the adapter's tensors only (the whole model for "full")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    n_saved = sum(t.numel() for t in saved.values())
    assert n_saved == peft.count_parameters(model)[0]
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert data.get("peft_type") == "LORA" if method in ("lora", "dora") else data["featherlm_method"] == method


@pytest.mark.parametrize("family,method", CASES)
def test_base_checkpoint_loads_strictly_after_apply(adapted, family, method):
    base, model = adapted(family, method)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert all(".adapter_" in k for k in missing), missing
    assert sorted(missing) == sorted(k for k in peft.adapter_state_dict(model) if ".adapter_" in k)


def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_uncached(adapted, method):
    _, model = adapted("llama", method)
    perturb_(model)
    prompts = [[5, 17, 3, 44, 9, 71], [8, 2]]  # different lengths: the batch is left-padded
    cached = generate_ids(model, prompts, GenerationConfig(max_new_tokens=6), pad_id=0)
    assert cached == [greedy_without_cache(model, p, 6) for p in prompts]


# ----------------------------------------------------------------------------- several adapters


def test_adapters_switch_per_call(tiny_model, tmp_path):
    base = tiny_model("llama", seed=3)
    ids = ids_for()
    expected = {}
    for name, seed, cfg in [("a", 1, config_for("lora", "llama")), ("b", 2, config_for("lora", "llama")),
                            ("c", 3, config_for("ia3", "llama"))]:
        model = copy.deepcopy(base)
        peft.apply(model, cfg)
        perturb_(model, seed)
        peft.save_adapter(model, None, tmp_path / name)
        expected[name] = output(model, ids).detach()
    model = copy.deepcopy(base)
    for name in "abc":
        peft.load_adapter(model, tmp_path / name, name=name)
    assert peft.adapter_names(model) == ["a", "b", "c"] and peft.active_adapter(model) == "c"
    with torch.no_grad():
        for name in "abca":  # same config: tensors copied in; another method: re-applied
            peft.set_active(model, name)
            assert torch.allclose(output(model, ids), expected[name], atol=1e-6), name
        with peft.using(model, "b"):
            assert torch.allclose(output(model, ids), expected["b"], atol=1e-6)
        assert peft.active_adapter(model) == "a"
        with peft.using(model, None):  # the plain base model
            assert torch.equal(output(model, ids), output(base, ids))
        assert torch.allclose(output(model, ids), expected["a"], atol=1e-6)
    with pytest.raises(ConfigError, match="no adapter named 'x'; loaded: a, b, c"):
        peft.set_active(model, "x")


def test_trained_weights_survive_a_switch(adapted):
    _, model = adapted("llama", "lora")
    perturb_(model)
    trained = peft.adapter_state_dict(model)
    trained = {k: v.clone() for k, v in trained.items()}
    peft.set_active(model, None)
    peft.set_active(model, "default")
    assert all(torch.equal(v, trained[k]) for k, v in peft.adapter_state_dict(model).items())


# ----------------------------------------------------------------------------- details and errors


def test_rslora_scales_by_sqrt_r(adapted):
    _, model = adapted("llama", "lora", r=16, alpha=8.0, rslora=True)
    assert model.layers[0].self_attn.q_proj.scaling == pytest.approx(8.0 / 4)
    _, model = adapted("llama", "lora", r=16, alpha=8.0)
    assert model.layers[0].self_attn.q_proj.scaling == pytest.approx(8.0 / 16)


def test_lora_runs_in_bfloat16(adapted):
    base, model = adapted("llama", "lora")
    perturb_(model)
    ids = ids_for(length=12)
    with torch.no_grad():
        ref = output(model, ids)
        low = output(model.to(torch.bfloat16), ids).float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_prompt_init_from_text_ids(tiny_model):
    model = tiny_model("llama")
    peft.apply(model, PeftConfig(method="prompt", num_virtual_tokens=5, prompt_init_text="hi"), init_ids=[7, 9])
    assert torch.equal(model.embed_prefix.adapter_prompt, model.embed_tokens.weight[[7, 9, 7, 9, 7]])
    with pytest.raises(ConfigError, match="init_ids"):
        peft.apply(tiny_model("llama"), PeftConfig(method="prompt", prompt_init_text="hi"))


def test_prefix_and_prompt_respect_padding(adapted):
    """A left-padded row gives the same logits as the same prompt alone."""
    for method in ("prefix", "prompt"):
        _, model = adapted("llama", method)
        row = torch.tensor([[5, 17, 3]])
        padded = torch.tensor([[0, 0, 5, 17, 3]])
        with torch.no_grad():
            alone = model(row).logits[0, -1]
            with_pad = model(padded, attention_mask=torch.tensor([[0, 0, 1, 1, 1]])).logits[0, -1]
        assert torch.allclose(alone, with_pad, atol=1e-5), method


@pytest.mark.parametrize("overrides,message", [
    (dict(method="lorra"), "did you mean 'lora'"),
    (dict(method="lora", target_modules=["qq_proj"]), "match no module"),
    (dict(method="lora", target_modules=["mlp"]), "linear layers only"),
    (dict(method="freeze", freeze="top:9"), "K must be in 1..2"),
    (dict(method="freeze", freeze="middle"), "is not one of"),
    (dict(method="freeze", freeze="head"), "leaves nothing to train"),
    (dict(method="lora", modules_to_save=["classifier"]), "match no module"),
])
def test_config_mistakes_are_config_errors(tiny_model, overrides, message):
    with pytest.raises(ConfigError, match=message):
        peft.apply(tiny_model("llama"), PeftConfig(**overrides))


def test_bad_values_and_double_apply(tiny_model):
    with pytest.raises(ConfigError, match="peft.r must be >= 1"):
        PeftConfig(r=0)
    model = peft.apply(tiny_model("llama"), PeftConfig())
    with pytest.raises(ConfigError, match="already has an adapter"):
        peft.apply(model, PeftConfig())
    with pytest.raises(ConfigError, match="no active adapter"):
        peft.adapter_state_dict(tiny_model("llama"))


def test_missing_or_corrupt_adapter_files(tiny_model, tmp_path):
    model = peft.apply(tiny_model("llama"), PeftConfig(method="ia3"))
    peft.save_adapter(model, None, tmp_path / "ok")
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        peft.load_adapter(tiny_model("llama"), tmp_path / "nothing")
    weights = tmp_path / "ok" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        peft.load_adapter(tiny_model("llama"), tmp_path / "ok")
    (tmp_path / "ok" / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        peft.load_adapter(tiny_model("llama"), tmp_path / "ok")


def test_adapter_for_another_shape_is_a_checkpoint_error(tiny_model, tmp_path):
    model = peft.apply(tiny_model("llama"), PeftConfig(r=4))
    peft.save_adapter(model, None, tmp_path / "a")
    with pytest.raises(CheckpointError, match="expects"):
        peft.load_adapter(tiny_model("llama", d_model=48, n_head=4), tmp_path / "a")


def test_gpt2_lora_falls_back_to_featherlms_format(tiny_model, tmp_path):
    """GPT-2 fuses q/k/v into one HF module, so its LoRA file cannot be PEFT's; it still round-trips."""
    model = peft.apply(tiny_model("gpt2"), PeftConfig(method="lora"))
    perturb_(model)
    peft.save_adapter(model, None, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["featherlm_method"] == "lora"
    fresh = tiny_model("gpt2")
    peft.load_adapter(fresh, tmp_path / "a")
    ids = ids_for()
    with torch.no_grad():
        assert torch.allclose(output(fresh, ids), output(model, ids), atol=1e-6)


class Classifier(torch.nn.Module):
    """A head around the transformer, as featherlm.model.heads builds: the backbone's names gain a prefix."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = torch.nn.Linear(backbone.config.d_model, 3)

    def forward(self, ids):
        return self.classifier(self.backbone(ids).pooled)


@pytest.mark.parametrize("modules_to_save,peft_format", [([], True), (["classifier"], False)])
def test_adapters_on_a_model_with_a_head(tiny_model, tmp_path, modules_to_save, peft_format):
    """Targets match inside the backbone; a head outside it is saved in featherlm's format."""
    torch.manual_seed(0)
    model = Classifier(tiny_model("bert", seed=3))
    fresh = copy.deepcopy(model)
    peft.apply(model, PeftConfig(method="lora", r=4, modules_to_save=modules_to_save))
    perturb_(model)
    assert all(k.startswith("backbone.layers.") or k.startswith("classifier.") for k in peft.adapter_state_dict(model))
    peft.save_adapter(model, None, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert ("peft_type" in data) == peft_format
    peft.load_adapter(fresh, tmp_path / "a")
    ids = ids_for()
    with torch.no_grad():
        assert torch.allclose(fresh(ids), model(ids), atol=1e-6)
