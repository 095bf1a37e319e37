"""SQuAD reading (v1.1, v2.0, JSONL; bad rows with lines), stride windows, spans back to characters."""

from __future__ import annotations

import json
import math

import pytest

from featherlm.data.qa import Question, answer_tokens, build_features, decode_answer, read_squad
from featherlm.errors import ConfigError, DataError
from featherlm.hub import resolve
from featherlm.tokenizer import Tokenizer

SQUAD_V2 = "qa/squad-v2-dev-subset/dev-5-articles.json"


@pytest.fixture(scope="module")
def bert_tok():
    return Tokenizer.from_dir(resolve("minilm-l6"))


def squad(paragraphs, version="1.1"):
    return {"version": version, "data": [{"title": "T", "paragraphs": paragraphs}]}


def write_json(tmp_path, obj, name="squad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def test_reads_the_real_squad_v2_subset(shared_data):
    data = read_squad(shared_data / SQUAD_V2)
    assert len(data) == 1407 and data.unanswerable == 702  # the counts SOURCES.md gives
    raw = json.loads((shared_data / SQUAD_V2).read_text())
    first = raw["data"][0]["paragraphs"][0]["qas"][0]
    q = data.questions[0]
    assert (q.id, q.question, q.title) == (first["id"], first["question"], "Normans")
    assert q.answers == [a["text"] for a in first["answers"]]
    lines = (shared_data / SQUAD_V2).read_text().splitlines()
    assert all(f'"{q.id}"' in lines[q.line - 1] for q in data.questions)  # each question knows its line


def test_v1_json_and_datasets_jsonl_give_the_same_questions(tmp_path):
    context = "The Normans were in Normandy in the 10th and 11th centuries."
    qas = [{"id": "a", "question": "Who?", "answers": [{"text": "The Normans", "answer_start": 0},
                                                       {"text": "Normans", "answer_start": 4}]},
           {"id": "b", "question": "When?", "answers": [{"text": "10th and 11th centuries", "answer_start": 36}]}]
    from_json = read_squad(write_json(tmp_path, squad([{"context": context, "qas": qas}])))
    jsonl = tmp_path / "squad.jsonl"
    jsonl.write_text("".join(json.dumps({"id": q["id"], "question": q["question"], "context": context,
                                         "answers": {"text": [a["text"] for a in q["answers"]],
                                                     "answer_start": [a["answer_start"] for a in q["answers"]]}}) + "\n"
                             for q in qas))
    from_jsonl = read_squad(jsonl)
    strip = [(q.id, q.question, q.context, q.answers, q.starts) for q in from_json.questions]
    assert strip == [(q.id, q.question, q.context, q.answers, q.starts) for q in from_jsonl.questions]
    assert [q.line for q in from_jsonl.questions] == [1, 2]
    assert from_json.questions[0].answers == ["The Normans", "Normans"] and from_json.unanswerable == 0


def test_unanswerable_questions_have_no_answers(tmp_path):
    qas = [{"id": "x", "question": "Why?", "answers": [], "plausible_answers": [{"text": "b", "answer_start": 2}],
            "is_impossible": True}]
    data = read_squad(write_json(tmp_path, squad([{"context": "a b c", "qas": qas}], "v2.0")))
    assert data.questions[0].answers == [] and data.unanswerable == 1


@pytest.mark.parametrize("qa,reason", [
    ({"id": "q1", "question": "Who?", "answers": [{"text": "Normans", "answer_start": 3}]},
     "answer 'Normans' is not at character 3"),
    ({"id": "q1", "question": "", "answers": [{"text": "The", "answer_start": 0}]}, "missing or empty 'question'"),
    ({"id": "q1", "question": "Who?", "answers": []}, "no answer, and not marked 'is_impossible'"),
    ({"id": "q1", "question": "Who?", "answers": [{"text": "The"}]}, "integer 'answer_start'"),
])
def test_bad_questions_name_their_line(tmp_path, qa, reason):
    good = {"id": "q0", "question": "What?", "answers": [{"text": "Normans", "answer_start": 4}]}
    path = write_json(tmp_path, squad([{"context": "The Normans.", "qas": [good, qa]}]))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if '"q1"' in text)
    with pytest.raises(DataError, match=reason) as err:
        read_squad(path)
    assert (err.value.path, err.value.line) == (str(path), line)
    data = read_squad(path, skip_bad_rows=True)
    assert [q.id for q in data.questions] == ["q0"] and [n for n, _ in data.skipped] == [line]


def test_file_level_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [\n  {"title": "x",\n  "paragraphs": [}\n]}')
    with pytest.raises(DataError, match="broken.json:3: broken JSON"):
        read_squad(broken)
    with pytest.raises(DataError, match="expected a SQuAD object"):
        read_squad(write_json(tmp_path, [1, 2]))
    with pytest.raises(DataError, match="no such file"):
        read_squad(tmp_path / "missing.json")
    with pytest.raises(DataError, match="paragraphs"):
        read_squad(write_json(tmp_path, {"data": [{"title": "x"}]}))


def context_tokens(feature):
    return [(t, o) for t, o in enumerate(feature["offsets"]) if o is not None]


def test_windows_overlap_by_the_stride_and_cover_the_context(bert_tok):
    context = " ".join(f"word{i} is here." for i in range(120))
    q = Question("q", "Where is word77?", context, ["word77"], [context.index("word77 ")])
    features = build_features([q], bert_tok, max_seq_len=48, doc_stride=12)
    assert len(features) > 3
    question_ids = bert_tok.encode(q.question, add_special_tokens=False)
    for f in features:
        assert len(f["input_ids"]) <= 48
        assert f["input_ids"][: len(question_ids) + 2] == [bert_tok.token_to_id("[CLS]"), *question_ids,
                                                            bert_tok.token_to_id("[SEP]")]
        assert f["input_ids"][-1] == bert_tok.token_to_id("[SEP]")
        assert set(f["token_type_ids"][len(question_ids) + 2:]) == {1}
    windows = [[o for _, o in context_tokens(f)] for f in features]
    for before, after in zip(windows, windows[1:], strict=False):
        assert before[-12:] == after[:12]  # exactly doc_stride tokens shared
    covered = sorted({o for w in windows for o in w})
    everything = [o for o in bert_tok.backend.encode(context, add_special_tokens=False).offsets]
    assert covered == everything  # every context token is in some window
    holding = [f for f in features if f["start"] != 0]
    assert holding and all(context[f["offsets"][f["start"]][0]:f["offsets"][f["end"]][1]] == "word77" for f in holding)
    for f in features:  # a window without the whole answer points at [CLS]
        spans = [o for _, o in context_tokens(f)]
        inside = spans[0][0] <= q.starts[0] and spans[-1][1] >= q.starts[0] + 6
        assert (f["start"] != 0) == inside and (f["start"] == 0) == (f["end"] == 0)


def test_real_answers_map_to_their_characters(shared_data, bert_tok):
    """Every answerable SQuAD question: some window holds the answer, and its tokens cover exactly the
    answer's characters (or the smallest token span around them, when the answer ends inside a word)."""
    data = read_squad(shared_data / SQUAD_V2)
    questions = [q for q in data.questions if q.answers][:300]
    features = build_features(questions, bert_tok, max_seq_len=128, doc_stride=32)
    found = {f["question"] for f in features if f["start"] != 0}
    assert found == set(range(len(questions)))
    exact = 0
    for f in features:
        if f["start"] == 0:
            continue
        q = questions[f["question"]]
        a, b = q.starts[0], q.starts[0] + len(q.answers[0])
        s, e = f["offsets"][f["start"]][0], f["offsets"][f["end"]][1]
        assert s <= a and e >= b
        assert f["offsets"][f["start"]][1] > a and f["offsets"][f["end"]][0] < b  # no extra token either side
        exact += q.context[s:e] == q.answers[0]
    assert exact >= 0.98 * sum(f["start"] != 0 for f in features)


def test_answer_tokens_edges():
    offsets = [None, None, (0, 3), (4, 9), (10, 12), None]
    assert answer_tokens(offsets, 4, 9) == (3, 3)
    assert answer_tokens(offsets, 0, 12) == (2, 4)
    assert answer_tokens(offsets, 5, 7) == (3, 3)  # inside one token
    assert answer_tokens(offsets, 10, 15) == (0, 0)  # runs past the window
    assert answer_tokens([None, None], 0, 1) == (0, 0)


def test_doc_stride_must_leave_room(bert_tok):
    q = Question("q", "Who?", "a b c d e f g", ["a"], [0])
    with pytest.raises(ConfigError, match="doc_stride"):
        build_features([q], bert_tok, max_seq_len=16, doc_stride=12)


def logp(values):
    top = max(values)
    norm = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - norm for v in values]


def test_decode_picks_the_best_valid_span_across_windows():
    context = "aa bb cc dd"
    q = Question("q", "?", context, [], [])
    offsets = [None, (0, 2), (3, 5), (6, 8), (9, 11), None]
    # window 1: the best start (token 4) has no valid end after it that scores well, the best end is
    # [SEP] (outside the context) and the next best (token 1) lies before every good start
    w1 = (logp([0, 0, 5, 1, 6, 0]), logp([0, 7, 0, 4, 0, 9]), offsets)
    w2 = (logp([9, 0, 0, 0, 0, 0]), logp([9, 0, 0, 0, 0, 0]), offsets)  # window 2: sure there is no answer
    out = decode_answer(q, [w1, w2], max_answer_len=30, allow_null=False)
    assert (out["answer"], out["start"], out["end"]) == ("bb cc", 3, 8)  # tokens 2..3: 5 + 4
    assert context[out["start"]:out["end"]] == out["answer"] and 0 < out["score"] < 1
    assert decode_answer(q, [w1], max_answer_len=1, allow_null=False)["answer"] == "aa"  # one token: 0 + 7 is best
    assert decode_answer(q, [w2], max_answer_len=30, allow_null=True)["answer"] == ""
    # null wins only when even the window least sure of "no answer" is surer than the best span
    assert decode_answer(q, [w1, w2], max_answer_len=30, allow_null=True)["answer"] == "bb cc"
