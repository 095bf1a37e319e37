"""Server fixtures: tiny models and runs, a registry, and real uvicorn servers on free loopback ports.

``registry`` (session) serves:
- ``tiny``: a random 2-layer Llama with a word-level tokenizer and a chat template (context 256);
- ``tiny:chat``: a LoRA sft run on ``tiny`` (answers "yes" after a positive word, "no" otherwise);
- ``sst``: a LoRA classification run on a tiny random BERT (its base is not served, so it has no prefix);
- ``minilm-l6``: the real all-MiniLM-L6-v2 (embeddings).
All in float32, so served outputs can be compared exactly with direct calls.

``task_registry`` serves NER and QA runs (``bert:ner``, ``bert:qa``) trained in seconds on toy data, with
``tiny`` and ``sst`` beside them; ``task_server`` serves it.

``start_server(registry, **create_app_options)`` runs ``create_app`` under uvicorn in a thread and
returns a ``Server`` (``url``, ``app``, ``engine``, ``client()`` an ``openai.OpenAI`` client);
``server`` is one such server for the session, with API key ``KEY``.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from featherlm.serve import ModelRegistry, create_app

KEY = "test-key-123"
POSITIVE = ["good", "great", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "film", "was", "is", "a", "plot", "story", "and", "but", "it", "this", "very", "quite"]
CHAT = ["user", "assistant", "system", "say", "yes", "no", "hello", "world", ".", ","]
WORDS = POSITIVE + NEGATIVE + FILLER + CHAT
CONTEXT = 256


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """Toy sentiment: label 1 iff the sentence holds a positive word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, rng.randint(2, 5)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def words() -> list[str]:
    """The vocabulary of the tiny models (the tokenizers add specials)."""
    return list(WORDS)


@pytest.fixture(scope="session")
def tiny_folder(tiny_chat_folder):
    return tiny_chat_folder(WORDS, context=CONTEXT, seed=0)


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory):
    """A random tiny BERT with a word-level tokenizer that wraps texts in [CLS] ... [SEP]."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    from featherlm.checkpoint import save_model
    from featherlm.config import preset
    from featherlm.model import Transformer
    from featherlm.tokenizer import Tokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    torch.manual_seed(0)
    model = Transformer(preset("bert", vocab_size=len(vocab), max_seq_len=64))
    folder = tmp_path_factory.mktemp("tiny_bert")
    save_model(model, Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]"), folder)
    return folder


def run_config(base, train, out, task: str, **train_options) -> dict:
    return {"model": {"name": str(base), "task": task}, "data": {"train": str(train), "eval": str(train)},
            "peft": {"method": "lora", "r": 4, "alpha": 8.0},
            "train": {"lr": 3e-2, "batch_size": 16, "log_every": 5, "seed": 0, **train_options},
            "out": {"dir": str(out), "plot": False}}


@pytest.fixture(scope="session")
def sft_run(tiny_folder, tmp_path_factory):
    """A LoRA sft run on ``tiny``: "say <sentence>" -> "yes ." or "no ."."""
    from featherlm.train import finetune

    tmp = tmp_path_factory.mktemp("sft")
    data = tmp / "chat.jsonl"
    with data.open("w") as f:
        for text, label in sentences(32, 1):
            f.write(json.dumps({"instruction": f"say {text}", "response": "yes ." if label else "no ."}) + "\n")
    finetune(run_config(tiny_folder, data, tmp / "run", "sft", max_steps=30, lr=5e-2), progress=False)
    return tmp / "run"


@pytest.fixture(scope="session")
def classify_run(tiny_bert_folder, tmp_path_factory):
    """A LoRA classification run on the tiny BERT (toy sentiment)."""
    from featherlm.train import finetune

    tmp = tmp_path_factory.mktemp("cls")
    data = tmp / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sentences(64, 2)))
    finetune(run_config(tiny_bert_folder, data, tmp / "run", "classification", max_steps=20), progress=False)
    return tmp / "run"


@pytest.fixture(scope="session")
def registry(tiny_folder, sft_run, classify_run) -> ModelRegistry:
    return ModelRegistry.load([f"tiny={tiny_folder}", "minilm-l6"], {"chat": str(sft_run), "sst": str(classify_run)},
                              dtype="float32")


# ----------------------------------------------------------------------------- NER and QA runs

PEOPLE = ["Okonkwo", "Johansson", "Fitzgerald"]
PLACES = ["Ouagadougou", "Reykjavik", "Timbuktu", "Kathmandu"]
NEWS = ["the", "news", "said", "that", "today", "we", "saw", "a", "big", "crowd", "near", "river", "and", "then"]


@pytest.fixture(scope="session")
def wordpiece_bert_folder(tmp_path_factory):
    """A random tiny BERT with all-MiniLM-L6-v2's real WordPiece tokenizer (as tests/train/test_ner_qa.py):
    rare names split into several subwords, so entity spans and answers must be mapped back to characters."""
    from featherlm.checkpoint import save_model
    from featherlm.config import preset
    from featherlm.hub import resolve
    from featherlm.model import Transformer
    from featherlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(resolve("minilm-l6"))
    torch.manual_seed(0)
    model = Transformer(preset("bert", vocab_size=tokenizer.vocab_size, max_seq_len=64))
    with torch.no_grad():  # far apart word vectors: a random 2-layer BERT at the usual 0.02 init learns too slowly
        model.embed_tokens.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("wordpiece_bert")
    save_model(model, tokenizer, folder)
    return folder


def task_config(base, train, out, task: str, max_seq_len: int, epochs: int, **data) -> dict:
    return {"model": {"name": str(base), "task": task}, "data": {"train": str(train), "eval": str(train), **data},
            "peft": {"method": "lora", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"lr": 3e-2, "epochs": epochs, "batch_size": 16, "max_seq_len": max_seq_len,
                      "warmup_ratio": 0.0, "seed": 0},
            "out": {"dir": str(out), "plot": False}}


@pytest.fixture(scope="session")
def ner_run(wordpiece_bert_folder, tmp_path_factory):
    """A LoRA NER run (CoNLL, IOB2): a person's name is B-PER, a place B-LOC, other words O. A few seconds."""
    from featherlm.train import finetune

    rng = random.Random(1)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(80):
        words = [(w, "O") for w in rng.sample(NEWS, rng.randint(3, 6))]
        words.insert(rng.randint(0, len(words)), (rng.choice(PLACES), "B-LOC") if rng.random() < 0.5
                     else (rng.choice(PEOPLE), "B-PER"))
        lines += [f"{w} {tag}" for w, tag in words] + [""]
    tmp = tmp_path_factory.mktemp("ner")
    (tmp / "train.txt").write_text("\n".join(lines), encoding="utf-8")
    finetune(task_config(wordpiece_bert_folder, tmp / "train.txt", tmp / "run", "ner", 32, 3), progress=False)
    return tmp / "run"


@pytest.fixture(scope="session")
def qa_run(wordpiece_bert_folder, tmp_path_factory):
    """A LoRA extractive-QA run (SQuAD 1.1): "what is the capital ?" -> the place after "the capital is".
    Windows of 48 tokens with a stride of 16, so long contexts are read in several windows."""
    from featherlm.train import finetune

    rng = random.Random(2)
    paragraphs = []
    for i in range(64):
        words = [rng.choice(NEWS) for _ in range(rng.randint(8, 16))]
        place, at = rng.choice(PLACES), rng.randint(0, len(words))
        before = " ".join(words[:at])
        context = " ".join(words[:at] + ["the", "capital", "is", place, "."] + words[at:])
        start = len(before) + (1 if before else 0) + len("the capital is ")
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "what is the capital ?",
                                                        "answers": [{"text": place, "answer_start": start}]}]})
    tmp = tmp_path_factory.mktemp("qa")
    (tmp / "train.json").write_text(json.dumps({"version": "v1.1", "data": [{"title": "toy",
                                                                             "paragraphs": paragraphs}]}))
    finetune(task_config(wordpiece_bert_folder, tmp / "train.json", tmp / "run", "qa", 48, 4, doc_stride=16),
             progress=False)
    return tmp / "run"


@pytest.fixture(scope="session")
def task_registry(wordpiece_bert_folder, tiny_folder, ner_run, qa_run, classify_run) -> ModelRegistry:
    """``bert`` (the NER and QA runs' base, so they are ``bert:ner`` and ``bert:qa``), ``tiny`` (a decoder),
    and ``sst`` (the classification run, on a base that is not served)."""
    return ModelRegistry.load([f"bert={wordpiece_bert_folder}", f"tiny={tiny_folder}"],
                              {"ner": str(ner_run), "qa": str(qa_run), "sst": str(classify_run)}, dtype="float32")


# ----------------------------------------------------------------------------- real servers


@dataclass
class Server:
    url: str
    app: object
    thread: threading.Thread
    uvicorn: object
    api_key: str | None

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, api_key: str | None = None, **options):
        """An ``openai.OpenAI`` client for this server (no retries: a 429 must reach the test)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "none", max_retries=0,
                             timeout=options.pop("timeout", 60), **options)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(15)


def start(registry: ModelRegistry, **options) -> Server:
    """Serve ``create_app(registry, **options)`` on a free loopback port, in a thread; wait until it listens."""
    import uvicorn

    app = create_app(registry, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free port, and the socket keeps it ours
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Server(f"http://127.0.0.1:{port}", app, thread, server, options.get("api_key"))


@pytest.fixture(scope="session")
def start_server():
    """Factory: ``start_server(registry, **create_app_options)``; every server stops at the session's end."""
    servers: list[Server] = []

    def make(registry: ModelRegistry, **options) -> Server:
        servers.append(start(registry, **options))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def server(registry, start_server) -> Server:
    """The session's server: API key ``KEY``, batches of up to 8 rows."""
    return start_server(registry, api_key=KEY, max_batch=8, max_queue=16)


@pytest.fixture(scope="session")
def task_server(task_registry, start_server) -> Server:
    """A server for ``task_registry`` (the NER and QA runs), with API key ``KEY``."""
    return start_server(task_registry, api_key=KEY, max_batch=4, max_queue=4)
