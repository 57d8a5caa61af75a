"""Seeded corruption of descriptor banks for the noisy-descriptor study.

Three kinds of noise, each applied at `rate` in [0, 1]: words dropped, typos
(adjacent characters swapped or a character deleted) and whole sentences
swapped in from another category. Rate 0 is the identity. Local phrases are
left as they are by default: they index the phrase table of the local loss.
"""
import copy

import numpy as np

KINDS = ("swap", "drop", "typo")


def _check_rate(rate):
  if not 0.0 <= float(rate) <= 1.0:
    raise ValueError(f"noise rate must be in [0, 1], got {rate}")
  return float(rate)


def drop_words(text, rate, rng):
  """Each word dropped with probability `rate`; at least one word is kept."""
  rate = _check_rate(rate)
  words = text.split()
  if rate == 0 or len(words) <= 1:
    return text
  keep = rng.random(len(words)) >= rate
  if not keep.any():
    keep[rng.integers(len(words))] = True
  return " ".join(w for w, k in zip(words, keep) if k)


def typo(word, rng):
  """One typo in `word`: two adjacent characters swapped or one deleted."""
  if len(word) < 2:
    return word
  i = int(rng.integers(len(word) - 1))
  if rng.random() < 0.5:
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]
  return word[:i] + word[i + 1:]


def add_typos(text, rate, rng):
  """Each word of 2+ characters gets a typo with probability `rate`."""
  rate = _check_rate(rate)
  if rate == 0:
    return text
  words = text.split(" ")
  hit = rng.random(len(words)) < rate
  return " ".join(typo(w, rng) if h else w for w, h in zip(words, hit))


def swap_sentences(bank, rate, rng):
  """Copy of `bank` in which each sentence is replaced, with probability
  `rate`, by a sentence of another category (drawn from the clean bank)."""
  rate = _check_rate(rate)
  out = copy.deepcopy(bank)
  if rate == 0:
    return out
  cats = list(bank["categories"])
  if len(cats) < 2:
    raise ValueError("swapping sentences between categories needs at least "
                     f"two categories; the bank has {cats}")
  for c in cats:
    others = [s for o in cats if o != c
              for s in bank["categories"][o]["sentences"]]
    sentences = out["categories"][c]["sentences"]
    for i in range(len(sentences)):
      if rng.random() < rate:
        sentences[i] = others[int(rng.integers(len(others)))]
  return out


def corrupt_bank(bank, rate, seed, kinds=KINDS, phrases=False):
  """Seeded noisy copy of a descriptor bank (`descriptors.load_bank` format).

  Sentences are first swapped across categories, then words dropped, then
  typos added, each at `rate`; `kinds` picks a subset. With `phrases=True`
  local phrases get word drops and typos too. The input is not modified.
  """
  rate = _check_rate(rate)
  unknown = set(kinds) - set(KINDS)
  if unknown:
    raise ValueError(f"unknown noise kinds {sorted(unknown)}; use {KINDS}")
  rng = np.random.default_rng(seed)
  out = swap_sentences(bank, rate, rng) if "swap" in kinds else (
      copy.deepcopy(bank))
  fields = ("sentences", "phrases") if phrases else ("sentences",)
  for c in out["categories"]:
    for field in fields:
      texts = out["categories"][c].get(field, [])
      for i, t in enumerate(texts):
        if "drop" in kinds:
          t = drop_words(t, rate, rng)
        if "typo" in kinds:
          t = add_typos(t, rate, rng)
        texts[i] = t
  return out
