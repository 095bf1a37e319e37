"""SequenceClassifier: pooling per family, padding invariance, names, and parity with transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from featherlm.checkpoint import build_model, read_checkpoint
from featherlm.errors import ConfigError
from featherlm.model import Transformer
from featherlm.model.heads import ClassifierConfig, SequenceClassifier, SpanExtractor, TokenClassifier


def classifier(backbone, pooling="auto", labels=("neg", "pos", "neutral")):
    torch.manual_seed(0)
    model = SequenceClassifier(backbone, ClassifierConfig(list(labels), pooling, dropout=0.1)).eval()
    with torch.no_grad():  # a visible head: the default init gives logits too close to 0 to compare
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.5)
    return model


def test_auto_pooling_follows_the_family(tiny_model):
    assert classifier(tiny_model("bert")).pooling == "pooler"
    assert classifier(tiny_model("bert", pooler=False)).pooling == "mean"
    assert classifier(tiny_model("llama")).pooling == "last"
    assert classifier(tiny_model("gpt2")).pooling == "last"


@pytest.mark.parametrize("family,pooling", [("bert", "pooler"), ("bert", "mean"), ("bert", "cls"),
                                            ("llama", "last"), ("llama", "mean"), ("gpt2", "last")])
def test_logits_ignore_padding(tiny_model, family, pooling):
    """A padded row gives the logits of the same row unpadded (right padding; left too for decoders)."""
    model = classifier(tiny_model(family), pooling)
    ids = torch.tensor([[5, 17, 42, 8, 23]])
    alone = model(ids, torch.ones_like(ids))
    assert alone.shape == (1, 3)
    padded = torch.tensor([[5, 17, 42, 8, 23, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(model(padded, mask), alone, rtol=1e-5, atol=1e-5)
    if family != "bert":  # decoders count positions from the first real token
        left = torch.tensor([[0, 0, 5, 17, 42, 8, 23]])
        torch.testing.assert_close(model(left, torch.tensor([[0, 0, 1, 1, 1, 1, 1]])), alone, rtol=1e-5, atol=1e-5)


def test_last_pooling_reads_the_last_real_token(tiny_model):
    model = classifier(tiny_model("llama"), "last")
    hidden = torch.arange(2 * 4 * 1.0).view(2, 4, 1).expand(2, 4, 32)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert model.pool(hidden, mask, None)[:, 0].tolist() == [1.0, 7.0]


def test_mean_pooling_averages_real_tokens_only(tiny_model):
    model = classifier(tiny_model("bert"), "mean")
    hidden = torch.tensor([[1.0, 3.0, 100.0]]).unsqueeze(-1).expand(1, 3, 32)
    assert model.pool(hidden, torch.tensor([[1, 1, 0]]), None)[0, 0].item() == 2.0


def test_names_keep_the_backbone_checkpoint_loadable(tiny_model):
    backbone = tiny_model("llama")
    model = classifier(backbone)
    names = set(model.state_dict())
    assert {"classifier.weight", "classifier.bias"} <= names
    assert "backbone.layers.0.self_attn.q_proj.weight" in names
    inner = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    Transformer(backbone.config).load_state_dict(inner, strict=True)
    assert model.labels == ["neg", "pos", "neutral"]


def test_dropout_acts_in_training_only(tiny_model):
    model = classifier(tiny_model("bert"), "mean")
    model.dropout.p = 0.5
    ids = torch.tensor([[5, 17, 42, 8, 23]])
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


def test_impossible_choices_are_config_errors(tiny_model):
    with pytest.raises(ConfigError, match="pooler"):
        classifier(tiny_model("llama"), "pooler")
    with pytest.raises(ConfigError, match="first token"):
        classifier(tiny_model("llama"), "cls")
    with pytest.raises(ConfigError, match="at least 2 labels"):
        classifier(tiny_model("bert"), labels=["only"])


def test_matches_transformers_bert_for_sequence_classification(hf_bert):
    """BERT pooled output -> dropout -> classifier, as BertForSequenceClassification computes it."""
    from transformers import BertForSequenceClassification

    folder, reference = hf_bert
    ours = classifier(build_model(read_checkpoint(folder)), "pooler")
    config = reference.config
    config.num_labels = 3
    hf = BertForSequenceClassification(config).eval()
    hf.bert.load_state_dict(reference.state_dict())
    hf.classifier.load_state_dict(ours.classifier.state_dict())
    ids = torch.tensor([[2, 11, 29, 40, 3, 0, 0], [2, 7, 8, 9, 10, 12, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(ids, mask), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- token classification, spans


def test_token_classifier_matches_transformers(hf_bert):
    """Final hidden states -> dropout -> classifier, as BertForTokenClassification computes them."""
    from transformers import BertForTokenClassification

    folder, reference = hf_bert
    torch.manual_seed(0)
    ours = TokenClassifier(build_model(read_checkpoint(folder)), ["O", "B-PER", "I-PER", "B-LOC"]).eval()
    with torch.no_grad():
        ours.classifier.weight.normal_(0, 0.5)
        ours.classifier.bias.normal_(0, 0.5)
    config = copy.deepcopy(reference.config)  # the fixture is shared: leave its config as it was
    config.num_labels = 4
    hf = BertForTokenClassification(config).eval()
    hf.bert.load_state_dict(reference.state_dict(), strict=False)  # no pooler in the token model
    hf.classifier.load_state_dict(ours.classifier.state_dict())
    ids = torch.tensor([[2, 11, 29, 40, 3, 0, 0], [2, 7, 8, 9, 10, 12, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    got = ours(ids, mask)
    assert got.shape == (2, 7, 4)
    torch.testing.assert_close(got * mask[..., None], expected * mask[..., None], rtol=1e-4, atol=1e-4)
    assert ours.labels == ["O", "B-PER", "I-PER", "B-LOC"]
    with pytest.raises(ConfigError, match="at least 2 labels"):
        TokenClassifier(build_model(read_checkpoint(folder)), ["O"])


def test_span_extractor_matches_transformers(hf_bert):
    """qa_outputs Linear(d, 2) split into start and end logits, as BertForQuestionAnswering."""
    from transformers import BertForQuestionAnswering

    folder, reference = hf_bert
    ours = SpanExtractor(build_model(read_checkpoint(folder))).eval()
    with torch.no_grad():
        ours.qa_outputs.weight.normal_(0, 0.5)
        ours.qa_outputs.bias.normal_(0, 0.5)
    config = copy.deepcopy(reference.config)
    config.num_labels = 2  # start and end
    hf = BertForQuestionAnswering(config).eval()
    hf.bert.load_state_dict(reference.state_dict(), strict=False)
    hf.qa_outputs.load_state_dict(ours.qa_outputs.state_dict())
    ids = torch.tensor([[2, 11, 29, 3, 40, 41, 3, 0], [2, 7, 3, 8, 9, 10, 12, 3]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    start, end = ours(ids, mask, types)
    assert start.shape == end.shape == (2, 8)
    torch.testing.assert_close(start * mask, expected.start_logits * mask, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(end * mask, expected.end_logits * mask, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours(ids, mask)[0], start)  # the segment ids reach the backbone


def test_token_heads_keep_backbone_names_and_ignore_padding(tiny_model):
    backbone = tiny_model("bert")
    for model, head in ((TokenClassifier(backbone, ["O", "B-X", "I-X"]), "classifier"),
                        (SpanExtractor(backbone), "qa_outputs")):
        names = set(model.state_dict())
        assert {f"{head}.weight", f"{head}.bias"} <= names
        inner = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
        Transformer(backbone.config).load_state_dict(inner, strict=True)
        model.eval()
        ids = torch.tensor([[5, 17, 42, 8]])
        alone = model(ids, torch.ones_like(ids))
        padded = model(torch.tensor([[5, 17, 42, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
        if head == "qa_outputs":
            alone, padded = torch.stack(alone), torch.stack(padded)
        torch.testing.assert_close(padded[..., :4] if head == "qa_outputs" else padded[:, :4], alone,
                                   rtol=1e-5, atol=1e-5)
