"""Byte-level BPE for v3-pydoc (HF `tokenizers`), trained on the training split only.

Ids 0 and 1 are the special tokens config.json names as bos/eos (DeepSeek-V3's spellings), then the 256
byte symbols, then the merges up to VOCAB_SIZE. No normalizer and a byte-level pre-tokenizer without a
prefix space, so decode(encode(text)) == text for any text. Training is deterministic for a given text (the
trainer breaks count ties by pair order); `train` additionally turns tokenizers' thread pool off so the
result cannot depend on scheduling.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

VOCAB_SIZE = 1024
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


def train(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
  """A fresh tokenizers.Tokenizer trained on texts (documents, in order)."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  from dq3jax.extras import require  # noqa: PLC0415

  require("tokenizers", "training v3-pydoc's tokenizer")
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[BOS, EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(list(texts), trainer=trainer)
  if tok.token_to_id(BOS) != 0 or tok.token_to_id(EOS) != 1 or tok.get_vocab_size() != vocab_size:
    raise RuntimeError("tokenizer: unexpected special ids or vocabulary size")
  return tok


def load(path: str):
  from dq3jax.extras import require  # noqa: PLC0415

  return require("tokenizers", f"reading {path}").Tokenizer.from_file(path)


def encode_docs(tok, texts: Iterable[str]) -> np.ndarray:
  """One int32 token stream: each document preceded by BOS (so no window spans two documents unmarked)."""
  bos = tok.token_to_id(BOS)
  out: list[int] = []
  for text in texts:
    out.append(bos)
    out.extend(tok.encode(text).ids)
  return np.asarray(out, np.int32)
