"""Classic baselines to compare transformers with on the same data and tokenizer: a Kneser-Ney
n-gram LM, RNN / LSTM / GRU LMs, and TextCNN / BiLSTM classifiers. Like the rest of ``model``,
they take token ids and know nothing of tokenizers or data files."""

from featherlm.model.baselines.ngram import KneserNeyLM
from featherlm.model.baselines.recurrent import BiLSTMClassifier, RecurrentConfig, RecurrentLM, RecurrentOutput
from featherlm.model.baselines.textcnn import TextCNN

__all__ = ["BiLSTMClassifier", "KneserNeyLM", "RecurrentConfig", "RecurrentLM", "RecurrentOutput", "TextCNN"]
