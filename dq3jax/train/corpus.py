"""The training text of v3-pydoc: Python's own reference manual, as every CPython install carries it.

Source: `pydoc_data.topics.topics`, the text of the language reference (and a few library pages such as
pdb and the sequence types) that `help("if")` prints: 79 topics, 464,970 characters in CPython 3.11.7,
the version the committed v3-pydoc weights were trained from. Other Python versions ship slightly different
text; the committed goldens therefore never re-read it (the held-out evaluation tokens are committed in
goldens/models/v3-pydoc/train/heldout_tokens.json). No stdlib docstrings are added: the manual alone is the
text the ~20 minute training budget can cover several times over (more text would mean fewer passes).

Split, fixed and deterministic:
  * held-out: the topics HELDOUT_KEYS, never trained on and not used to train the tokenizer.
    "formatstrings" (the format-spec mini-language) and "import" (the import system) are prose plus
    examples and share no line with any other topic, so the held-out text is really unseen.
  * train: every other topic in sorted key order, minus any topic that shares a line of at least
    OVERLAP_LINE characters with a held-out topic. Many topics are sections of others ("if" is part of
    "compound"), so without this rule a chapter could leak its held-out section back in; with the current
    held-out keys it removes nothing on 3.11.7, and it keeps the split clean should the keys change.
"""

from __future__ import annotations

import dataclasses
import sys

HELDOUT_KEYS = ("formatstrings", "import")
OVERLAP_LINE = 40  # characters of a stripped line that count as shared text


@dataclasses.dataclass(frozen=True)
class Split:
  train_keys: tuple[str, ...]
  heldout_keys: tuple[str, ...]
  excluded_keys: tuple[str, ...]  # dropped from train for sharing lines with held-out text
  train_texts: tuple[str, ...]
  heldout_texts: tuple[str, ...]

  def describe(self) -> dict:
    return {
      "source": "pydoc_data.topics.topics (Python reference manual)",
      "python": sys.version.split()[0],
      "train_keys": list(self.train_keys),
      "heldout_keys": list(self.heldout_keys),
      "excluded_keys": list(self.excluded_keys),
      "train_chars": sum(map(len, self.train_texts)),
      "heldout_chars": sum(map(len, self.heldout_texts)),
    }


def topics() -> dict[str, str]:
  from pydoc_data.topics import topics as t  # noqa: PLC0415

  return dict(t)


def _long_lines(text: str) -> set[str]:
  return {s for s in (line.strip() for line in text.splitlines()) if len(s) >= OVERLAP_LINE}


def split(source: dict[str, str] | None = None, heldout_keys: tuple[str, ...] = HELDOUT_KEYS) -> Split:
  """The train / held-out split of `source` (default: this Python's pydoc topics)."""
  source = topics() if source is None else source
  missing = [k for k in heldout_keys if k not in source]
  if missing:
    raise ValueError(f"held-out topics {missing} are not in this Python's pydoc_data.topics")
  held = tuple(sorted(heldout_keys))
  held_lines = set().union(*(_long_lines(source[k]) for k in held))
  train, excluded = [], []
  for key in sorted(source):
    if key in held:
      continue
    (excluded if _long_lines(source[key]) & held_lines else train).append(key)
  return Split(
    train_keys=tuple(train),
    heldout_keys=held,
    excluded_keys=tuple(excluded),
    train_texts=tuple(source[k] for k in train),
    heldout_texts=tuple(source[k] for k in held),
  )
