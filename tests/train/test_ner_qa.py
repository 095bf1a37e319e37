"""NER and QA end to end on tiny models: a toy pattern is learnt, evaluate and predict work from the CLI.

The tiny BERT (2 layers, width 32, random weights) uses MiniLM-L6's real WordPiece tokenizer, so
words split into several subwords and the alignment code is exercised as on real data.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from featherlm.checkpoint import save_model
from featherlm.cli import main
from featherlm.config import preset
from featherlm.data.ner import read_conll, split_words
from featherlm.evaluate import answer_questions, predict_entities
from featherlm.evaluate.entities import to_bioes
from featherlm.hub import resolve
from featherlm.model import Transformer
from featherlm.tokenizer import Tokenizer
from featherlm.train import finetune, load_run
from featherlm.train.config import load_config

FIRST_NAMES = ["Okonkwo", "Johansson", "Fitzgerald"]  # B-PER
SURNAMES = ["Nakamura", "Kowalski", "Papadopoulos"]  # I-PER: always after a first name, so a word's tag is its own
PLACES = ["Ouagadougou", "Reykjavik", "Timbuktu", "Kathmandu", "Valparaiso", "Tegucigalpa"]
FILLER = ["the", "news", "said", "that", "today", "we", "saw", "a", "big", "crowd", "near", "river", "and", "then",
          "people", "walked", "home", "after", "lunch", "quietly"]


@pytest.fixture(scope="module")
def tiny_wordpiece_bert(tmp_path_factory) -> str:
    """A featherlm folder: a random tiny BERT with MiniLM-L6's WordPiece tokenizer (30,522 ids)."""
    tokenizer = Tokenizer.from_dir(resolve("minilm-l6"))
    torch.manual_seed(0)
    model = Transformer(preset("bert", vocab_size=tokenizer.vocab_size, max_seq_len=128))
    with torch.no_grad():  # far apart word vectors: at BERT's 0.02 init a random 2-layer model gives every
        model.embed_tokens.weight.normal_(0, 1.0)  # word nearly the same state, too slow to learn in a test
    folder = tmp_path_factory.mktemp("tiny_wordpiece_bert")
    save_model(model, tokenizer, folder)
    return str(folder)


def ner_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Filler words around people (a first name, B-PER, maybe a surname, I-PER) and places (B-LOC)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [(w, "O") for w in rng.sample(FILLER, rng.randint(3, 8))]
        entity = [(rng.choice(PLACES), "B-LOC")] if rng.random() < 0.5 else \
            [(rng.choice(FIRST_NAMES), "B-PER")] + ([(rng.choice(SURNAMES), "I-PER")] if rng.random() < 0.5 else [])
        at = rng.randint(0, len(words))
        out.append(words[:at] + entity + words[at:])
    return out


def write_conll(path, sentences, bioes: bool = False) -> None:
    lines = []
    for sentence in sentences:
        tags = [t for _, t in sentence]
        tags = to_bioes(tags) if bioes else tags
        lines += [f"{w} NN O {t}" for (w, _), t in zip(sentence, tags, strict=True)] + [""]
    path.write_text("-DOCSTART- -X- -X- O\n\n" + "\n".join(lines), encoding="utf-8")


@pytest.fixture
def ner_files(tmp_path):
    """(train in BIOES, dev in IOB2): 160 and 40 toy sentences."""
    train, dev = tmp_path / "train.txt", tmp_path / "dev.txt"
    write_conll(train, ner_sentences(160, 1), bioes=True)
    write_conll(dev, ner_sentences(40, 2))
    return train, dev


def qa_rows(n: int, seed: int) -> list[dict]:
    """SQuAD 2.0 paragraphs: filler text with "the capital is PLACE ." somewhere (the answer), or without
    it (unanswerable, a quarter of them). Contexts of ~40-80 tokens: several windows at max_seq_len 48."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(25, 50))]
        place = rng.choice(PLACES)
        answerable = rng.random() < 0.75
        at = rng.randint(0, len(words))
        before = " ".join(words[:at])
        context = " ".join(words[:at] + (["the", "capital", "is", place, "."] if answerable else []) + words[at:])
        qa = {"id": f"q{seed}-{i}", "question": "what is the capital ?", "is_impossible": not answerable,
              "answers": []}
        if answerable:
            start = len(before) + (1 if before else 0) + len("the capital is ")
            qa["answers"] = [{"text": place, "answer_start": start}]
        paragraphs.append({"context": context, "qas": [qa]})
    return paragraphs


@pytest.fixture
def qa_files(tmp_path):
    paths = []
    for name, n, seed in (("train.json", 96, 1), ("dev.json", 24, 2)):
        path = tmp_path / name
        path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "toy", "paragraphs": qa_rows(n, seed)}]}))
        paths.append(path)
    return tuple(paths)


def ner_config(model: str, train, dev, out, **train_options) -> dict:
    return {"model": {"name": model, "task": "ner"}, "data": {"train": str(train), "eval": str(dev)},
            "peft": {"method": "lora", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"lr": 3e-2, "epochs": 5, "batch_size": 16, "max_seq_len": 64, "warmup_ratio": 0.0,
                      "seed": 0, **train_options},
            "out": {"dir": str(out), "plot": False}}


def test_tiny_ner_run_learns_toy_entities_and_predicts_spans(tmp_path, tiny_wordpiece_bert, ner_files, capsys):
    train, dev = ner_files
    out = tmp_path / "ner"
    result = finetune(ner_config(tiny_wordpiece_bert, train, dev, out), progress=False)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert result["finished"] and len(evals) == 5
    first, last = evals[0], result["eval"]
    assert result["best_value"] >= 0.9 and last["loss"] < first["loss"]
    assert set(last["per_type"]) == {"LOC", "PER"}
    _, _, cfg = load_run(out)
    assert cfg.model.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # learnt from the BIOES file, as IOB2

    model, tokenizer, _ = load_run(out)
    text = "Yesterday Johansson Nakamura walked home to Ouagadougou, said the news."
    (entities,) = predict_entities(model, tokenizer, [text])
    assert all(text[e["start"]:e["end"]] == e["text"] and e["entity"] == e["type"] for e in entities)
    assert all(0 < e["score"] <= 1 for e in entities)
    found = {(e["type"], e["text"]) for e in entities}
    assert ("LOC", "Ouagadougou") in found and ("PER", "Johansson Nakamura") in found
    # a text longer than the window is tagged in pieces at word boundaries; offsets still index the text
    long_text = " ".join(["the crowd walked home quietly ."] * 12 + [text])
    (pieces,) = predict_entities(model, tokenizer, [long_text], max_seq_len=16)
    assert all(long_text[e["start"]:e["end"]] == e["text"] for e in pieces)
    assert ("LOC", "Ouagadougou") in {(e["type"], e["text"]) for e in pieces}
    assert predict_entities(model, tokenizer, ["", "   "]) == [[], []]

    # the CLI verb prints the same entities
    rc = main(["predict", "--adapter", str(out), "--task", "ner", "--text", text, "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and printed["entities"] == json.loads(json.dumps(entities))
    rc = main(["predict", "--adapter", str(out), "--question", "who?", "--context", "x"])
    assert rc == 2 and "needs --text" in capsys.readouterr().err


def test_ner_evaluation_matches_seqeval_on_the_written_predictions(tmp_path, tiny_wordpiece_bert, ner_files):
    """The run's evaluation (word tags from first subwords) scores as seqeval does on the same tags."""
    from seqeval.metrics import f1_score

    train, dev = ner_files
    out = tmp_path / "ner"
    finetune(ner_config(tiny_wordpiece_bert, train, dev, out, epochs=1), progress=False)
    model, tokenizer, cfg = load_run(out)
    task = cfg.task
    data = task.read(cfg, str(dev), tokenizer)
    result = task.evaluate(model, data, cfg=cfg, tokenizer=tokenizer, batch_size=8, pad_id=0)
    gold = read_conll(dev).tags
    assert result["f1"] == pytest.approx(f1_score(gold, result["predictions"]))
    assert [len(p) for p in result["predictions"]] == [len(g) for g in gold]


def qa_config(model: str, train, dev, out, **train_options) -> dict:
    return {"model": {"name": model, "task": "qa"},
            "data": {"train": str(train), "eval": str(dev), "doc_stride": 16},
            "peft": {"method": "lora", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"lr": 3e-2, "epochs": 6, "batch_size": 16, "max_seq_len": 48, "warmup_ratio": 0.0,
                      "seed": 0, **train_options},
            "out": {"dir": str(out), "plot": False}}


def test_tiny_qa_run_learns_toy_answers(tmp_path, tiny_wordpiece_bert, qa_files, capsys):
    train, dev = qa_files
    out = tmp_path / "qa"
    result = finetune(qa_config(tiny_wordpiece_bert, train, dev, out), progress=False)
    _, _, cfg = load_run(out)
    assert cfg.data.unanswerable == "null"  # "auto" resolved on the SQuAD 2.0 training file, and saved
    assert result["train_examples"] > 96  # long contexts: more windows than questions
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in evals if r["split"] == "eval")
    last = result["eval"]
    assert last["questions"] == 24 and last["features"] > 24
    assert last["has_answer_total"] + last["no_answer_total"] == 24  # SQuAD 2.0 breakdown
    assert result["best_value"] >= 80 and result["best_value"] > first["f1"] and last["loss"] < first["loss"]

    model, tokenizer, cfg = load_run(out)
    dev_data = json.loads(dev.read_text())["data"][0]["paragraphs"]
    answerable = [p for p in dev_data if p["qas"][0]["answers"]]
    answers = answer_questions(model, tokenizer, [p["qas"][0]["question"] for p in answerable],
                               [p["context"] for p in answerable], max_seq_len=48, doc_stride=16)
    assert all(p["context"][a["start"]:a["end"]] == a["answer"] for p, a in zip(answerable, answers, strict=True))
    right = sum(a["answer"] == p["qas"][0]["answers"][0]["text"] for p, a in zip(answerable, answers, strict=True))
    assert right >= 0.75 * len(answerable)

    p = answerable[0]
    rc = main(["predict", "--adapter", str(out), "--question", p["qas"][0]["question"], "--context", p["context"],
               "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and p["context"][printed["start"]:printed["end"]] == printed["answer"]


def test_qa_subset_limits_questions_not_windows(tmp_path, tiny_wordpiece_bert, qa_files):
    train, dev = qa_files
    cfg = load_config(qa_config(tiny_wordpiece_bert, train, dev, tmp_path / "x"))
    tokenizer = Tokenizer.from_dir(tiny_wordpiece_bert)
    data = cfg.task.read(cfg, str(train), tokenizer)
    small = cfg.task.subset(data, 10, seed=0)
    assert len(small.source.questions) == 10 and len(small.examples) > 10
    assert sorted({f["question"] for f in small.examples}) == list(range(10))
    ids = {q.id for q in small.source.questions}
    windows = sum(1 for f in data.examples if data.source.questions[f["question"]].id in ids)
    assert len(small.examples) == windows  # every window of a kept question, no other


def test_qa_eval_ratio_holds_out_whole_questions(tmp_path, tiny_wordpiece_bert, qa_files):
    train, dev = qa_files
    cfg = load_config(qa_config(tiny_wordpiece_bert, train, dev, tmp_path / "x"))
    data = cfg.task.read(cfg, str(train), Tokenizer.from_dir(tiny_wordpiece_bert))
    kept, held = cfg.task.split(data, 0.25, seed=0)
    assert len(held.source.questions) == 24 and len(kept.source.questions) == 72
    assert {q.id for q in held.source.questions}.isdisjoint(q.id for q in kept.source.questions)
    assert len(kept.examples) + len(held.examples) == len(data.examples)  # every window, on its question's side
    owner = {id(f["offsets"]): data.source.questions[f["question"]].id for f in data.examples}
    for part in (kept, held):
        assert {f["question"] for f in part.examples} == set(range(len(part.source.questions)))
        assert all(part.source.questions[f["question"]].id == owner[id(f["offsets"])] for f in part.examples)


def test_skip_mode_leaves_unanswerable_questions_out(tmp_path, tiny_wordpiece_bert, qa_files):
    train, dev = qa_files
    cfg = load_config(qa_config(tiny_wordpiece_bert, train, dev, tmp_path / "x"))
    cfg.data.unanswerable = "skip"
    data = cfg.task.read(cfg, str(dev), Tokenizer.from_dir(tiny_wordpiece_bert))
    assert all(q.answers for q in data.source.questions) and data.source.left_out > 0
    assert not data.source.allow_null


def test_evaluate_json_through_the_cli_subprocess(tmp_path, tiny_wordpiece_bert, ner_files, capsys):
    """`featherlm evaluate --json` in a fresh process: the reloaded best checkpoint scores what training saw."""
    train, dev = ner_files
    out = tmp_path / "ner"
    result = finetune(ner_config(tiny_wordpiece_bert, train, dev, out, epochs=1), progress=False)
    proc = subprocess.run([sys.executable, "-m", "featherlm.cli", "evaluate", "--adapter", str(out), "--data", str(dev),
                           "--task", "ner", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["task"] == "ner" and "predictions" not in scores
    for key in ("f1", "precision", "recall", "accuracy", "loss"):
        assert scores[key] == pytest.approx(result["eval"][key], abs=1e-6), key
    assert main(["evaluate", "--adapter", str(out)]) == 0  # plain text: a row per entity type
    table = capsys.readouterr().out
    assert table.split("\n").count("type       precision    recall        f1   support") == 1 and "\nPER " in table
    bad = tmp_path / "bad.txt"  # a user mistake: one line on stderr, exit code 2 (in process: one subprocess is enough)
    bad.write_text("Paris B-LOC\nrains\n")
    assert main(["evaluate", "--adapter", str(out), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"featherlm evaluate: error: {bad}:2: expected 'TOKEN ... TAG' (at least 2 columns), got 1 column: " \
                  "'rains'\n"


def test_split_words_feeds_predict_with_offsets():
    text = "  Okonkwo\tvisited  Reykjavik."
    assert [(w, text[s:e]) for w, s, e in split_words(text)] == [(w, w) for w in ["Okonkwo", "visited", "Reykjavik",
                                                                                  "."]]
