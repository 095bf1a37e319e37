"""LoRA/DoRA adapter files carry over between featherlm and Hugging Face ``peft``, both ways.

The base models are the tiny random HF folders of conftest (Llama with grouped-query attention and
an untied lm_head; BERT); featherlm reads them with read_checkpoint/build_model. Each direction
compares the logits (hidden states for BERT) of the two libraries on the same adapter.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import BertModel, LlamaForCausalLM

from featherlm import peft as fpeft
from featherlm.checkpoint import build_model, read_checkpoint
from featherlm.errors import CheckpointError
from featherlm.peft import PeftConfig, hf_format

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 8, 45, 90]])


def perturb_(model, seed: int = 1) -> None:
    """Non-zero LoRA B (and moved magnitudes): a zero update would hide a wrong name or transpose."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(fpeft.adapter_state_dict(model).items()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def featherlm_out(model) -> torch.Tensor:
    out = model(IDS)
    return out.logits if out.logits is not None else out.hidden


def hf_out(model) -> torch.Tensor:
    out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


HF_CLASS = {"hf_llama": LlamaForCausalLM, "hf_bert": BertModel}


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SOME = ["layers.1.self_attn.q_proj", "v_proj"]  # q_proj of one layer only: PEFT gets full module paths
SOME_HF = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("fixture,config,targets", [
    ("hf_llama", PeftConfig(method="lora", r=4, alpha=8.0, target_modules=ALL_LINEAR), sorted(ALL_LINEAR)),
    ("hf_llama", PeftConfig(method="lora", r=4, alpha=8.0, rslora=True, modules_to_save=["lm_head"]),
     ["q_proj", "v_proj"]),
    ("hf_llama", PeftConfig(method="dora", r=4, alpha=8.0, target_modules=SOME), SOME_HF),
    ("hf_bert", PeftConfig(method="lora", r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]), ["query", "value"]),
    ("hf_bert", PeftConfig(method="dora", r=4, alpha=8.0, target_modules=["q_proj", "up_proj"]),
     ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
      "encoder.layer.1.attention.self.query", "encoder.layer.1.intermediate.dense"]),  # "dense" is ambiguous
], ids=["llama-lora", "llama-rslora-lm_head", "llama-dora-some-layers", "bert-lora", "bert-dora"])
def test_featherlm_adapter_loads_in_peft(request, tmp_path, fixture, config, targets):
    folder, _ = request.getfixturevalue(fixture)
    model = build_model(read_checkpoint(folder))
    fpeft.apply(model, config)
    perturb_(model)
    fpeft.save_adapter(model, config, tmp_path / "adapter")
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["use_dora"] == (config.method == "dora")
    assert data["target_modules"] == targets
    assert all(".lora_" in k or k == "base_model.model.lm_head.weight"
               for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))

    hf = PeftModel.from_pretrained(HF_CLASS[fixture].from_pretrained(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = featherlm_out(model), hf_out(hf)
        plain = hf_out(HF_CLASS[fixture].from_pretrained(folder).eval())
    assert (theirs - plain).abs().max() > 1e-2  # the adapter does change the outputs
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("fixture,use_dora,targets,layers", [
    ("hf_llama", False, ["q_proj", "v_proj", "gate_proj"], None),
    ("hf_llama", True, ["k_proj", "o_proj", "up_proj"], None),
    ("hf_llama", False, ["q_proj", "v_proj", "gate_proj"], [1]),
    ("hf_bert", False, ["query", "value", "intermediate.dense"], None),
], ids=["llama-lora", "llama-dora", "llama-lora-layer-1", "bert-lora"])
def test_peft_adapter_loads_in_featherlm(request, tmp_path, fixture, use_dora, targets, layers):
    folder, _ = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    # init_lora_weights=False: random, non-zero B
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, init_lora_weights=False,
                      layers_to_transform=layers)
    hf = get_peft_model(HF_CLASS[fixture].from_pretrained(folder), lora)
    if use_dora:  # move the magnitudes off ||W|| too
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.3)
    hf.save_pretrained(tmp_path / "adapter")

    model = build_model(read_checkpoint(folder))
    config = fpeft.load_adapter(model, tmp_path / "adapter")
    assert config.method == ("dora" if use_dora else "lora") and config.r == 4 and config.alpha == 8
    if fixture == "hf_llama":  # featherlm's names are Llama's
        expect = sorted(f"layers.{i}.{'self_attn' if 'proj' in t and t[0] in 'qkvo' else 'mlp'}.{t}"
                        for t in targets for i in layers) if layers else sorted(targets)
        assert config.target_modules == expect
    with torch.no_grad():
        assert (featherlm_out(model) - hf_out(hf.eval())).abs().max() < 1e-4
    # same gradients (DoRA: its weight norm counts as a constant in backward in both)
    featherlm_out(model).pow(2).mean().backward()
    hf_out(hf).pow(2).mean().backward()
    theirs = {n.replace(".default", "").removesuffix(".weight"): p.grad for n, p in hf.named_parameters()
              if p.requires_grad}
    _, ours = hf_format.to_peft({k: p.grad for k, p in model.named_parameters() if p.requires_grad}, config,
                                model, "", model.config)
    ours = {k.removesuffix(".weight"): v for k, v in ours.items()}
    assert ours.keys() == theirs.keys() and len(ours) == 3 * len(layers or [0, 1]) * (3 if use_dora else 2)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5, rtol=1e-4) for k in ours)
    # and back: featherlm writes what it read
    fpeft.save_adapter(model, config, tmp_path / "again")
    before = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_peft_options_are_clear_errors(hf_llama, tmp_path):
    folder, _ = hf_llama
    hf = get_peft_model(LlamaForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules=["q_proj"],
                                                                                bias="lora_only"))
    hf.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="bias='lora_only' is not supported"):
        fpeft.load_adapter(build_model(read_checkpoint(folder)), tmp_path / "adapter")
