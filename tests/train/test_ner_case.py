"""NER casing features (``model.case_features``): classes read from the words as written, which survive
an uncased tokenizer; a head that uses them; a tiny run that can only learn its toy through them;
saved runs (with and without the option) that reload and predict the same.

The tiny BERT uses MiniLM-L6's real (uncased) WordPiece tokenizer: "Rose" and "rose" are the same ids.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from featherlm.checkpoint import save_model
from featherlm.config import preset
from featherlm.data.ner import CASE_CLASSES, NerData, case_ids, encode_ner, encode_words, word_case
from featherlm.evaluate import predict_entities
from featherlm.hub import resolve
from featherlm.model import Transformer
from featherlm.model.heads import TokenClassifier
from featherlm.tokenizer import Tokenizer
from featherlm.train import finetune, load_run

# Names that are ordinary words when not capitalised: once lower-cased by the tokenizer, only the
# casing features can tell "Rose" (a person) from "rose" (a flower).
PEOPLE = ["Rose", "Hope", "Grace", "Faith", "Joy", "Amber"]
FILLER = ["the", "news", "said", "that", "today", "we", "saw", "a", "big", "crowd", "near", "river", "and",
          "then", "people", "walked", "home", "after", "lunch", "quietly"]


@pytest.fixture(scope="module")
def wordpiece():
    return Tokenizer.from_dir(resolve("minilm-l6"))


@pytest.fixture(scope="module")
def tiny_uncased_bert(tmp_path_factory, wordpiece) -> str:
    torch.manual_seed(0)
    model = Transformer(preset("bert", vocab_size=wordpiece.vocab_size, max_seq_len=128))
    with torch.no_grad():  # far apart word vectors, as in test_ner_qa: a 2-layer random model learns fast
        model.embed_tokens.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("tiny_uncased_bert")
    save_model(model, wordpiece, folder)
    return str(folder)


def case_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Filler with one or two ambiguous names, each capitalised (B-PER) or not (O) at random: a model
    blind to case can at best tag them all, for an F1 near 2 * 0.5 / (1 + 0.5) = 0.67."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [(w, "O") for w in rng.sample(FILLER, rng.randint(3, 7))]
        for _ in range(rng.randint(1, 2)):
            name = rng.choice(PEOPLE)
            at = rng.randint(1, len(words))  # never first: a sentence's first word is capitalised anyway
            words.insert(at, (name, "B-PER") if rng.random() < 0.5 else (name.lower(), "O"))
        out.append(words)
    return out


def write_conll(path, sentences) -> None:
    lines = []
    for sentence in sentences:
        lines += [f"{w} NN O {t}" for w, t in sentence] + [""]
    path.write_text("-DOCSTART- -X- -X- O\n\n" + "\n".join(lines), encoding="utf-8")


@pytest.fixture
def case_files(tmp_path):
    train, dev = tmp_path / "train.txt", tmp_path / "dev.txt"
    write_conll(train, case_sentences(200, 1))
    write_conll(dev, case_sentences(60, 2))
    return train, dev


def config(model: str, train, dev, out, case_features: bool) -> dict:
    return {"model": {"name": model, "task": "ner", "case_features": case_features},
            "data": {"train": str(train), "eval": str(dev)},
            "peft": {"method": "lora", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"lr": 1e-2, "epochs": 5, "batch_size": 16, "max_seq_len": 64, "warmup_ratio": 0.0,
                      "seed": 0},
            "out": {"dir": str(out), "plot": False}}


# ----------------------------------------------------------------------------- casing classes


def test_word_case_classes():
    expected = {"the": "lower", "o'clock": "lower", "Paris": "title", "I": "title", "Wal-mart": "title",
                "EU": "upper", "U.S.": "upper", "McDonald": "mixed", "O'Neil": "mixed", "iPhone": "mixed",
                "1996": "number", "1,000.5": "number", "08-22": "number", "F1": "alnum", "1990s": "alnum",
                ",": "punct", "(": "punct", "--": "punct", "Müller": "title", "ÉTÉ": "upper"}
    assert {w: CASE_CLASSES[word_case(w)] for w in expected} == expected
    assert CASE_CLASSES[0] == "none"  # reserved for special tokens and padding: no word has it
    assert 0 not in {word_case(w) for w in expected}


def test_case_ids_come_from_the_words_as_written_and_survive_lower_casing(wordpiece):
    words = ["Rose", "met", "ROSE", "in", "rose", "Garden", "ville", "McRosenberg"]
    lowered = [w.lower() for w in words]
    ((ids, word_ids),) = encode_words(wordpiece, [words], 64)
    ((ids_lower, _),) = encode_words(wordpiece, [lowered], 64)
    assert ids == ids_lower  # the uncased tokenizer sees no difference at all...
    cases = case_ids(word_ids, words)
    assert cases != case_ids(word_ids, lowered)  # ...the casing features do
    by_word = {}
    for w, c in zip(word_ids, cases, strict=True):
        if w is None:
            assert c == 0  # [CLS], [SEP]
        else:
            by_word.setdefault(w, set()).add(c)
    # every subword of a word (McRosenberg is several) carries its word's class
    assert {w: CASE_CLASSES[c.pop()] for w, c in by_word.items() if len(c) == 1} == dict(enumerate(
        ["title", "lower", "upper", "lower", "lower", "title", "lower", "mixed"]))
    assert word_ids.count(7) > 1


def test_encode_ner_carries_case_ids_aligned_with_tokens(wordpiece):
    data = NerData("x", [["EU", "rejects", "German", "call", "."]], [["B-ORG", "O", "B-MISC", "O", "O"]], [1], "iob2")
    (example,) = encode_ner(data, wordpiece, 64, ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG"])
    assert len(example["case_ids"]) == len(example["input_ids"])
    firsts = [example["case_ids"][p] for p in example["first"]]
    assert [CASE_CLASSES[c] for c in firsts] == ["upper", "lower", "title", "lower", "punct"]
    (cut,) = encode_ner(data, wordpiece, 4, ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG"])  # truncated alike
    assert len(cut["case_ids"]) == len(cut["input_ids"]) == 4 and cut["case_ids"][-1] == 0


# ----------------------------------------------------------------------------- the head


def test_case_head_starts_as_the_plain_head_and_then_uses_the_classes(tiny_model):
    backbone = tiny_model("bert")
    torch.manual_seed(0)
    plain = TokenClassifier(backbone, ["O", "B-X", "I-X"]).eval()
    torch.manual_seed(0)
    cased = TokenClassifier(backbone, ["O", "B-X", "I-X"], case_classes=len(CASE_CLASSES)).eval()
    ids = torch.tensor([[2, 17, 42, 8, 3]])
    mask = torch.ones_like(ids)
    lower, title = torch.tensor([[0, 1, 1, 1, 0]]), torch.tensor([[0, 2, 1, 3, 0]])
    torch.testing.assert_close(cased(ids, mask, case_ids=title), plain(ids, mask))  # zero-initialised
    with torch.no_grad():
        cased.case_embed.weight.normal_(0, 1.0)
    assert not torch.allclose(cased(ids, mask, case_ids=title), cased(ids, mask, case_ids=lower))
    with pytest.raises(ValueError, match="case_ids"):
        cased(ids, mask)
    # padding is still ignored; the backbone (shared with the plain head) is unchanged by the option
    padded = cased(torch.tensor([[2, 17, 42, 8, 3, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0]]),
                   case_ids=torch.tensor([[0, 2, 1, 3, 0, 0]]))
    torch.testing.assert_close(padded[:, :5], cased(ids, mask, case_ids=title), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone(ids, attention_mask=mask).hidden,
                               tiny_model("bert")(ids, attention_mask=mask).hidden)
    assert {k for k in cased.state_dict() if not k.startswith("backbone.")} == {
        "classifier.weight", "classifier.bias", "case_embed.weight"}


# ----------------------------------------------------------------------------- runs


def eval_f1(out) -> float:
    return max(json.loads(line)["f1"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["split"] == "eval")


def test_case_features_learn_what_the_uncased_tokenizer_hides_and_reload(tmp_path, tiny_uncased_bert,
                                                                         case_files, capsys):
    train, dev = case_files
    with_case, without = tmp_path / "case", tmp_path / "plain"
    finetune(config(tiny_uncased_bert, train, dev, with_case, True), progress=False)
    finetune(config(tiny_uncased_bert, train, dev, without, False), progress=False)
    # "Rose" and "rose" are one token sequence: without casing the model can only guess
    assert eval_f1(with_case) >= 0.9 and eval_f1(without) < 0.8

    model, tokenizer, cfg = load_run(with_case)
    assert cfg.model.case_features and model.case_classes == len(CASE_CLASSES)
    assert "case_embed" in cfg.peft.modules_to_save
    assert model.case_embed.weight.abs().sum() > 0  # trained, and loaded from the adapter
    # the reloaded run scores what the run recorded for its best checkpoint
    task = cfg.task
    result = task.evaluate(model, task.read(cfg, str(dev), tokenizer), cfg=cfg, tokenizer=tokenizer,
                           batch_size=8, pad_id=0)
    best = json.loads((with_case / "best" / "eval.json").read_text())
    assert result["f1"] == pytest.approx(best["f1"])

    text = "we saw Rose near the river and Hope said that the rose was a joy"  # the toy's words only
    (entities,) = predict_entities(model, tokenizer, [text])
    assert {(e["type"], e["text"]) for e in entities} == {("PER", "Rose"), ("PER", "Hope")}
    again, tokenizer2, _ = load_run(with_case)  # a second load predicts identically
    assert predict_entities(again, tokenizer2, [text]) == [entities]
    from featherlm.cli import main  # the CLI verb (and so the server's predict_entities) uses the features
    rc = main(["predict", "--adapter", str(with_case), "--task", "ner", "--text", text, "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and printed["entities"] == json.loads(json.dumps(entities))


def test_runs_saved_before_the_option_still_load(tmp_path, tiny_uncased_bert, case_files):
    train, dev = case_files
    out = tmp_path / "old"
    cfg = config(tiny_uncased_bert, train, dev, out, False)
    cfg["train"]["epochs"] = 1
    finetune(cfg, progress=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["model"]["case_features"]  # a config.yaml written before the field existed
    saved["peft"]["modules_to_save"] = ["classifier"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    model, tokenizer, cfg = load_run(out)
    assert not cfg.model.case_features and model.case_embed is None
    (entities,) = predict_entities(model, tokenizer, ["we saw Rose near the river"])
    assert all(e["type"] == "PER" for e in entities)
