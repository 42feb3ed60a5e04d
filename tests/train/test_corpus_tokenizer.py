"""The v3-pydoc corpus split and its tokenizer: fixed, disjoint, lossless."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from dq3jax.train import corpus, tokenizer

MODEL = pathlib.Path(__file__).resolve().parents[2] / "goldens" / "models" / "v3-pydoc"


def test_split_is_disjoint_and_deterministic():
  a, b = corpus.split(), corpus.split()
  assert a == b
  assert set(a.heldout_keys) == set(corpus.HELDOUT_KEYS)
  assert not set(a.train_keys) & set(a.heldout_keys) and not set(a.excluded_keys) & set(a.train_keys)
  assert list(a.train_keys) == sorted(a.train_keys)
  assert sorted((*a.train_keys, *a.heldout_keys, *a.excluded_keys)) == sorted(corpus.topics())
  # No held-out line of corpus.OVERLAP_LINE characters or more appears anywhere in the training text.
  held = set().union(*(corpus._long_lines(t) for t in a.heldout_texts))
  assert not held & set().union(*(corpus._long_lines(t) for t in a.train_texts))


def test_split_drops_training_topics_that_contain_heldout_text():
  shared = "a line long enough to count as shared text between two topics\n"
  src = {"chapter": "intro\n" + shared, "section": shared + "more\n", "other": "unrelated text\n"}
  s = corpus.split(src, heldout_keys=("section",))
  assert s.train_keys == ("other",) and s.excluded_keys == ("chapter",) and s.heldout_keys == ("section",)
  with pytest.raises(ValueError, match="not in this Python"):
    corpus.split(src, heldout_keys=("missing",))


def test_committed_tokenizer_round_trips_text():
  tok = tokenizer.load(str(MODEL / "hf" / "tokenizer.json"))
  assert tok.get_vocab_size() == tokenizer.VOCAB_SIZE
  assert (tok.token_to_id(tokenizer.BOS), tok.token_to_id(tokenizer.EOS)) == (0, 1)
  for text in (
    corpus.split().heldout_texts[0][:3000],
    "def f(x):\n\treturn x  # ümlaut, 中文, emoji 🐍, \x00 and trailing spaces   \n\n",
    "",
  ):
    ids = tok.encode(text).ids
    assert max(ids, default=0) < tokenizer.VOCAB_SIZE and tokenizer.BOS not in tok.decode(ids)
    assert tok.decode(ids) == text
  held = json.loads((MODEL / "train" / "heldout_tokens.json").read_text())
  assert tok.decode(held["token_ids"], skip_special_tokens=False) == held["text"]


def test_tokenizer_training_is_deterministic():
  texts = corpus.split().train_texts[:6]
  a, b = tokenizer.train(texts, vocab_size=400), tokenizer.train(texts, vocab_size=400)
  assert a.to_str() == b.to_str()


def test_committed_tokenizer_is_this_code_on_this_corpus():
  report = json.loads((MODEL / "train" / "report.json").read_text())
  if sys.version.split()[0] != report["corpus"]["python"]:
    pytest.skip(
      f"pydoc topics of Python {sys.version.split()[0]}, weights built from {report['corpus']['python']}"
    )
  fresh = tokenizer.train(corpus.split().train_texts)
  committed = tokenizer.load(str(MODEL / "hf" / "tokenizer.json"))
  assert fresh.to_str() == committed.to_str()
