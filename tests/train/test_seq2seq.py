"""Translation and summarization tasks: on a decoder (prompt/response, loss on the target only) and on an
encoder-decoder (T5, trained from scratch here); losses against per-example and transformers' references,
batched generation against one-by-one, metrics against sacrebleu / rouge-score.

Summarization data is not in ../shared/data: the summarization tests use pairs written here.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from featherlm.checkpoint import build_model, export_hf, read_checkpoint, scratch_checkpoint
from featherlm.errors import ConfigError
from featherlm.evaluate import evaluate
from featherlm.tokenizer import Tokenizer
from featherlm.train import finetune, load_config, load_run
from featherlm.train.tasks import get_task

LETTERS = list("abcd")
WORDS = ["translate", "summarize", ":", "hello", "world", "bonjour", "monde", "cat", "chat", "dog", "chien",
         "the", "long", "story", "short", "end", ".", *LETTERS]
LEXICON = {"hello": "bonjour", "world": "monde", "cat": "chat", "dog": "chien"}


def t5_tokenizer(folder) -> str:
    """A word-level tokenizer laid out as T5's: <pad> 0, </s> 1 (appended to every text), <unk> 2."""
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    Tokenizer(backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save(folder)
    return str(folder)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def reverse_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = [rng.choice(LETTERS) for _ in range(rng.randint(2, 3))]
        rows.append({"source": " ".join(word), "target": " ".join(reversed(word))})
    return rows


def lexicon_rows(n: int, seed: int) -> list[dict]:
    """Word-by-word "translation" of 1-3 words: hello world -> bonjour monde."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(list(LEXICON)) for _ in range(rng.randint(1, 3))]
        rows.append({"source": " ".join(words), "target": " ".join(LEXICON[w] for w in words)})
    return rows


def summary_rows(n: int, seed: int) -> list[dict]:
    """Toy summaries: a "document" of filler words around a key word; its summary is the key word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(["cat", "dog", "hello", "world"])
        doc = rng.sample(["the", "long", "story", "short", "end"], 4) + [key, "."]
        rows.append({"document": " ".join(doc), "summary": key})
    return rows


def run_config(tmp_path, name: str, task: str, train_path: str, **sections) -> dict:
    """A run's config; ``sections`` update single keys of a section (``train={"lr": 1e-3}``)."""
    cfg = {"model": {"name": name, "task": task}, "data": {"train": train_path, "prompt": "translate : {source}"},
           "peft": {"method": "lora", "r": 4, "alpha": 8.0},
           "train": {"lr": 3e-2, "batch_size": 8, "epochs": 1, "seed": 0, "max_seq_len": 48},
           "out": {"dir": str(tmp_path / "run"), "plot": False}}
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values}
    return cfg


@pytest.fixture(scope="module")
def chat_model(tiny_chat_folder):
    """A random Llama folder with a chat template (decoder-only, prompt/response layout)."""
    return str(tiny_chat_folder(WORDS, context=64, seed=1))


# ----------------------------------------------------------------------------- an encoder-decoder from scratch


def test_scratch_t5_learns_to_reverse_sequences(tmp_path):
    tok = t5_tokenizer(tmp_path / "tok")
    files = (write_jsonl(tmp_path / f"{n}.jsonl", reverse_rows(k, s)) for n, k, s in (("t", 2000, 0), ("d", 40, 1)))
    train_file, dev = files
    cfg = run_config(tmp_path, "scratch:t5", "translation", train_file,
                     model={"tokenizer": tok, "overrides": {"d_model": 32, "d_ff": 128}},
                     data={"eval": dev, "prompt": "{source}"}, peft={"method": "full"},
                     train={"lr": 5e-3, "batch_size": 32, "max_steps": 180, "eval_every": 180, "warmup_ratio": 0.05,
                            "weight_decay": 0.0})
    summary = finetune(cfg, progress=False)
    assert summary["metric"] == "bleu" and summary["eval"]["generated"] == 40
    model, tokenizer, config = load_run(tmp_path / "run")  # the scratch model is rebuilt, then its weights loaded
    assert config.model.name == "scratch:t5" and model.config.encoder_decoder and model.config.d_model == 32
    task = get_task("translation")
    data = task.read(config, dev, tokenizer)
    result = task.evaluate(model, data, cfg=config, tokenizer=tokenizer, batch_size=16, pad_id=0)
    references = data.source.targets
    exact = sum(p == r for p, r in zip(result["predictions"], references, strict=True)) / len(references)
    assert exact >= 0.9, list(zip(result["predictions"], references, strict=True))[:5]
    assert result["bleu"] == pytest.approx(summary["eval"]["bleu"])  # the run's best checkpoint, re-scored


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("scratch:t5", {"peft": {"method": "full"}}, "set model.tokenizer"),
    ("scratch:t5", {"model": {"tokenizer": "minilm-l6"}}, "peft.method full, not lora"),
    ("minilm-l6", {"model": {"tokenizer": "minilm-l6"}}, "model.tokenizer and model.overrides are for new models"),
    ("scratch:t5", {"model": {"tokenizer": "x", "size": "huge"}, "peft": {"method": "full"}}, "unknown model size"),
])
def test_scratch_config_mistakes_are_config_errors(tmp_path, model, extra, message):
    train = write_jsonl(tmp_path / "t.jsonl", reverse_rows(4, 0))
    cfg = run_config(tmp_path, model, "translation", train, **extra)
    if "size" in extra.get("model", {}):
        cfg["model"]["tokenizer"] = t5_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match=message):
        finetune(cfg, progress=False)


def test_prompt_template_mistakes_name_the_setting(tmp_path, chat_model):
    train = write_jsonl(tmp_path / "t.jsonl", lexicon_rows(4, 0))
    for prompt, message in (("", "set data.source_lang and data.target_lang"),
                            ("translate {text}", "must contain {source}"), ("{source} {", "not a valid template")):
        with pytest.raises(ConfigError, match=message):
            finetune(run_config(tmp_path, chat_model, "translation", train, data={"prompt": prompt}), progress=False)


def test_encoder_decoder_loss_matches_transformers(tmp_path):
    """The batch layout (left-padded prompts, right-padded targets, shift right) gives transformers' T5 loss."""
    from transformers import T5ForConditionalGeneration

    tokenizer = Tokenizer.from_dir(t5_tokenizer(tmp_path / "tok"))
    ckpt = scratch_checkpoint("t5", tokenizer, overrides={"d_model": 32, "d_ff": 64, "mlp": "gated",
                                                          "activation": "gelu_tanh", "tie_embeddings": False,
                                                          "scale_output": False})
    model = build_model(ckpt)
    hf = T5ForConditionalGeneration.from_pretrained(export_hf(model, tokenizer, tmp_path / "hf")).eval()
    cfg = load_config(run_config(tmp_path, "scratch:t5", "translation", "unused", data={"prompt": "{source}"},
                                 model={"tokenizer": "x"}, peft={"method": "full"}))
    task = get_task("translation")
    data = task.read(cfg, write_jsonl(tmp_path / "p.jsonl", lexicon_rows(5, 3)), tokenizer)
    batch = task.collate(data.examples, pad_id=0)
    P = int(batch["prompt_width"])
    with torch.no_grad():
        loss, n = task.loss(model, batch)
        expected = hf(input_ids=batch["input_ids"][:, :P], attention_mask=batch["attention_mask"][:, :P],
                      labels=batch["labels"][:, P:].contiguous()).loss
    assert n == sum(len(e["input_ids"]) - e["prompt_len"] for e in data.examples) == task.terms(batch)
    assert float(loss) / n == pytest.approx(float(expected), abs=1e-5)


# ----------------------------------------------------------------------------- decoder-only (prompt / response)


def test_decoder_loss_is_on_targets_only_and_padding_free(tmp_path, chat_model):
    cfg = load_config(run_config(tmp_path, chat_model, "translation", "unused"))
    ckpt = read_checkpoint(chat_model)
    model, task = build_model(ckpt), get_task("translation")
    data = task.read(cfg, write_jsonl(tmp_path / "p.jsonl", lexicon_rows(5, 4)), ckpt.tokenizer)
    assert len({len(e["input_ids"]) for e in data.examples}) > 1  # rows of different lengths: padding on both sides
    batch = task.collate(data.examples, pad_id=ckpt.tokenizer.pad_id)
    with torch.no_grad():
        loss, n = task.loss(model, batch)
        expected, terms = 0.0, 0
        for e in data.examples:  # each row alone, unpadded: the target tokens' next-token loss
            ids, p = torch.tensor([e["input_ids"]]), e["prompt_len"]
            logits = model(ids).logits[0, p - 1:-1]
            expected += float(F.cross_entropy(logits, ids[0, p:], reduction="sum"))
            terms += ids.shape[1] - p
    assert n == terms and float(loss) == pytest.approx(expected, rel=1e-5)


def test_batched_generation_equals_one_at_a_time(tmp_path, chat_model):
    cfg = load_config(run_config(tmp_path, chat_model, "translation", "unused", data={"eval_max_new_tokens": 6}))
    ckpt = read_checkpoint(chat_model)
    model, task = build_model(ckpt), get_task("translation")
    data = task.read(cfg, write_jsonl(tmp_path / "p.jsonl", lexicon_rows(6, 5)), ckpt.tokenizer)
    pad = ckpt.tokenizer.pad_id
    together = task.generate(model, ckpt.tokenizer, data.examples, cfg, batch_size=6, pad_id=pad)
    alone = task.generate(model, ckpt.tokenizer, data.examples, cfg, batch_size=1, pad_id=pad)
    assert together == alone and any(together)


def test_lora_translation_run_reports_bleu_and_evaluates_again(tmp_path, chat_model):
    train = write_jsonl(tmp_path / "t.jsonl", lexicon_rows(60, 6))
    cfg = run_config(tmp_path, chat_model, "translation", train,
                     data={"eval_ratio": 0.2, "max_eval_generate": 5, "eval_beams": 2},
                     train={"epochs": 2})
    summary = finetune(cfg, progress=False)
    first = summary["eval"]
    assert summary["metric"] == "bleu" and first["generated"] == 5
    assert {"bleu", "chrf", "loss", "perplexity"} <= set(first)
    assert summary["train_examples"] == 48 and summary["eval_examples"] == 12
    again = evaluate(tmp_path / "run")  # the run's own held-out pairs, best checkpoint
    assert again["bleu"] == pytest.approx(first["bleu"]) and again["loss"] == pytest.approx(first["loss"])


# ----------------------------------------------------------------------------- summarization and metrics


def test_summarization_run_reports_rouge(tmp_path, chat_model):
    train_file, dev = (write_jsonl(tmp_path / f"{n}.jsonl", summary_rows(k, s)) for n, k, s in (("t", 24, 0),
                                                                                                  ("d", 6, 1)))
    summary = finetune(run_config(tmp_path, chat_model, "summarization", train_file,
                                  data={"eval": dev, "prompt": ""}, train={"max_steps": 3}), progress=False)
    assert summary["metric"] == "rougeL"
    assert {"rouge1", "rouge2", "rougeL", "loss"} <= set(summary["eval"])


def test_scores_match_the_reference_packages():
    import sacrebleu
    from rouge_score import rouge_scorer

    cfg = load_config({"model": {"name": "m", "task": "translation"}, "data": {"train": "x", "target_lang": "French"}})
    hyps, refs = ["le chat est noir .", "bonjour le monde"], ["le chat est noir .", "bonjour tout le monde"]
    scores = get_task("translation").score(hyps, refs, cfg)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    cfg.data.target_lang = "Chinese"  # scored by characters, as sacrebleu's "zh" tokenizer does
    zh_hyps, zh_refs = ["我爱你。", "今天天气很好"], ["我爱你。", "今天天气不错"]
    zh = get_task("translation").score(zh_hyps, zh_refs, cfg)
    assert zh["bleu"] == pytest.approx(sacrebleu.corpus_bleu(zh_hyps, [zh_refs], tokenize="zh").score)
    assert zh["bleu"] != pytest.approx(sacrebleu.corpus_bleu(zh_hyps, [zh_refs]).score)
    rouge = get_task("summarization").score(hyps, refs, cfg)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)) / 2
    assert rouge["rougeL"] == pytest.approx(expected)


def test_evaluate_cli_scores_a_model_on_the_recipes_held_out_pairs(tmp_path, chat_model, capsys):
    """BLEU before tuning: `featherlm evaluate --task translation --model M --config RECIPE` scores the
    untuned model on exactly the pairs a run of RECIPE holds out; with --adapter, the run itself."""
    import yaml

    from featherlm.cli import main
    from featherlm.evaluate.seq2seq import evaluate_translation
    from featherlm.train.trainer import read_data

    train = write_jsonl(tmp_path / "t.jsonl", lexicon_rows(40, 7))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(run_config(tmp_path, chat_model, "translation", train,
                                                data={"eval_ratio": 0.25, "max_eval_generate": 4})))
    assert main(["evaluate", "--task", "translation", "--model", chat_model, "--config", str(recipe), "--json"]) == 0
    before = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert before["held_out"] and before["pairs"] == 10 and before["generated"] == 4 and len(before["samples"]) == 3
    cfg, task = load_config(recipe), get_task("translation")
    ckpt = read_checkpoint(chat_model)
    _, held, _ = read_data(cfg, task, ckpt.tokenizer)  # the trainer's own split of the recipe's data
    expected = task.evaluate(build_model(ckpt), held, cfg=cfg, tokenizer=ckpt.tokenizer, batch_size=16,
                             pad_id=ckpt.tokenizer.pad_id)
    assert before["loss"] == pytest.approx(expected["loss"]) and before["bleu"] == pytest.approx(expected["bleu"])
    assert [s["prediction"] for s in before["samples"]] == expected["predictions"][:3]

    summary = finetune(recipe, progress=False)
    after = evaluate_translation(model=None, adapter=str(tmp_path / "run"), data=None, options={})
    assert after["pairs"] == 10 and after["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-4)


def test_a_prompt_template_on_the_command_line_stays_text():
    from featherlm.train import parse_overrides

    assert parse_overrides(["--data.prompt", "{source}"]) == {"data": {"prompt": "{source}"}}
    assert parse_overrides(["--model.overrides", "{n_layer: 4}"]) == {"model": {"overrides": {"n_layer": 4}}}
