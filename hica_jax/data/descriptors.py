"""Descriptor banks: category sentences and local phrases per data set.

A bank is JSON: {"categories": {name: {"sentences": [...], "phrases": [...]}},
"unseen": [names held out of stage 2]}. Built-in banks live in `banks/`.
"""
import json
import os

BANK_DIR = os.path.join(os.path.dirname(__file__), "banks")


def load_bank(name_or_path):
  """Loads a bank by built-in name (e.g. "synthetic_chestxray") or JSON path."""
  # A bare name is a built-in bank (a stray file of that name in the working
  # directory must not shadow it); anything path-like is a file.
  is_path = name_or_path.endswith(".json") or os.sep in name_or_path
  path = name_or_path if is_path else os.path.join(BANK_DIR,
                                                    f"{name_or_path}.json")
  if not os.path.exists(path):
    known = sorted(f[:-5] for f in os.listdir(BANK_DIR) if f.endswith(".json"))
    raise FileNotFoundError(
        f"Descriptor bank {name_or_path!r} not found: give a JSON file path or "
        f"one of the built-in banks {known}.")
  with open(path) as f:
    bank = json.load(f)
  if not bank.get("categories"):
    raise ValueError(f"{path}: a descriptor bank needs a non-empty "
                     "'categories' mapping (see docs/design.md).")
  for cat, entry in bank["categories"].items():
    if not entry.get("sentences"):
      raise ValueError(f"{path}: category {cat!r} has no 'sentences'; every "
                       "category needs at least one descriptor sentence.")
    entry.setdefault("phrases", [])
  bank.setdefault("unseen", [])
  return bank


def phrase_list(bank):
  """All local phrases of a bank in a fixed order; phrase_id indexes this list."""
  phrases = []
  for entry in bank["categories"].values():
    for p in entry["phrases"]:
      if p not in phrases:
        phrases.append(p)
  return phrases
