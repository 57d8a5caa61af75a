"""The descriptor bank of a task tokenised once: TextTables.

`build_text_tables(bank, classes, ...)` turns the sentences of the task's
classes and every local phrase of the bank into token tables that the
preprocessor (`preprocess.Preprocessor`) indexes and the evaluators embed;
`text_corpus` lists every text of a bank (for the tokenizer and stage 1's
text objective).
"""
import dataclasses

import numpy as np

from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import descriptors


@dataclasses.dataclass
class TextTables:
  """Tokenised descriptor bank for one task (an ordered list of classes).

  desc_ids/desc_mask: i32[D, L] every sentence of every class in `classes`;
  desc_category: i32[D] its class index; sentences: the D sentences as text
  (re-tokenised when a flip swaps their laterality); phrase_ids/phrase_mask:
  i32[P+1, Lp] every local phrase of the bank, the last row the empty phrase;
  class_phrase_rows: per class index, the rows of its own bank phrases
  (what `stage2.loss.phrases='class'` draws from).
  """
  classes: list
  desc_ids: np.ndarray
  desc_mask: np.ndarray
  desc_category: np.ndarray
  phrases: list
  phrase_ids: np.ndarray
  phrase_mask: np.ndarray
  tokenizer: object
  max_len: int
  sentences: list = None
  max_phrase_len: int = None
  class_phrase_rows: list = None

  @property
  def num_classes(self):
    return len(self.classes)

  def sentence_rows(self, class_index):
    return np.flatnonzero(self.desc_category == class_index)

  def phrase_row(self, phrase):
    """Row of `phrase` in the phrase table and its id (-1 for none/unknown)."""
    if phrase and phrase in self._phrase_index:
      i = self._phrase_index[phrase]
      return i, i
    return len(self.phrases), -1

  def __post_init__(self):
    self._phrase_index = {p: i for i, p in enumerate(self.phrases)}
    if self.max_phrase_len is None:
      self.max_phrase_len = self.phrase_ids.shape[1]


def build_text_tables(bank, classes, tokenizer, max_len, max_phrase_len):
  sentences, cats = [], []
  for ci, c in enumerate(classes):
    if c not in bank["categories"]:
      raise KeyError(f"Category {c!r} has no entry in the descriptor bank; add "
                     f"sentences for it (bank has {list(bank['categories'])}).")
    for s in bank["categories"][c]["sentences"]:
      sentences.append(s)
      cats.append(ci)
  ids, mask = tokenizer_lib.tokenize(tokenizer, sentences, max_len)
  phrases = descriptors.phrase_list(bank)
  pids, pmask = tokenizer_lib.tokenize(tokenizer, phrases + [""],
                                       max_phrase_len)
  index = {p: i for i, p in enumerate(phrases)}
  class_rows = [np.asarray([index[p] for p in bank["categories"][c]["phrases"]],
                           np.int32) for c in classes]
  return TextTables(classes=list(classes), desc_ids=ids, desc_mask=mask,
                    desc_category=np.asarray(cats, np.int32), phrases=phrases,
                    phrase_ids=pids, phrase_mask=pmask, tokenizer=tokenizer,
                    max_len=max_len, sentences=sentences,
                    max_phrase_len=max_phrase_len,
                    class_phrase_rows=class_rows)


def text_corpus(bank, extra_texts=()):
  """Every sentence and phrase of a bank plus extra texts (reports)."""
  out = []
  for entry in bank["categories"].values():
    out.extend(entry["sentences"])
    out.extend(entry.get("phrases", []))
  out.extend(t for t in extra_texts if t)
  return out
