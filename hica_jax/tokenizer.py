"""The one tokenizer path of the project.

- `train_wordpiece(texts, out_dir)`: a lower-cased BERT-style WordPiece vocabulary
  trained with `tokenizers` on the run's corpus and saved as a Hugging Face
  folder in the workdir, so a run's checkpoints are self-contained.
- `load_tokenizer(path)`: any local HF folder (ours, CLIP, BERT, ...) through
  `AutoTokenizer`, offline.
- `tokenize(tokenizer, texts, max_len)`: numpy ids/mask padded or truncated to max_len,
  with the tokenizer's own template ([CLS] ... [SEP] for ours and BERT,
  <|startoftext|> ... <|endoftext|> for CLIP).
- `special_ids(tokenizer)`: pad / mask / cls / sep / unk ids (None when absent) and vocab size.
"""
import collections
import os
from typing import Sequence

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = 0


def train_wordpiece(texts: Sequence[str], out_dir: str, vocab_size: int = 1000):
  """Trains a lower-case WordPiece vocab on `texts`, saves a HF folder in out_dir.

  Returns the tokenizer loaded back from out_dir (so it is exactly what a resumed run sees).
  """
  from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers,
                          processors)
  from transformers import PreTrainedTokenizerFast

  texts = [t for t in texts if t and t.strip()]
  if not texts:
    raise ValueError("train_wordpiece: the corpus is empty; pass at least one non-empty text")
  normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                         handle_chinese_chars=True,
                                         strip_accents=None)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  # A deterministic vocabulary (the tokenizers trainer breaks ties in hash-map
  # order, so the same corpus gave different ids run to run): every character
  # and its ## continuation, then whole words by frequency, ties alphabetical.
  # Words that do not fit fall back to WordPiece pieces of characters.
  counts = collections.Counter(
      w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(
          normalizer.normalize_str(t)))
  chars = sorted({c for w in counts for c in w})
  base = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
  words = sorted((w for w in counts if w not in set(base)),
                 key=lambda w: (-counts[w], w))
  vocab_list = base + words[:max(0, vocab_size - len(base))]
  tok = Tokenizer(models.WordPiece(
      vocab={t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]",
      continuing_subword_prefix="##", max_input_chars_per_word=100))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.WordPiece(prefix="##")
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
      sep_token="[SEP]", mask_token="[MASK]", padding_side="right", truncation_side="right",
      model_input_names=["input_ids", "attention_mask"])
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return load_tokenizer(out_dir)


def load_tokenizer(path: str):
  """Local HF tokenizer folder -> tokenizer (offline; never touches the network)."""
  from transformers import AutoTokenizer

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path!r} does not exist; train one with "
                            "train_wordpiece or point to a Hugging Face model folder.")
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001  (re-raised with the folder named)
    raise ValueError(f"could not load a tokenizer from {path!r} (needs tokenizer.json or "
                     f"vocab files and tokenizer_config.json): {e}") from e


def tokenize(tokenizer, texts: Sequence[str], max_len: int):
  """texts -> (ids int32[N, max_len], mask int32[N, max_len]), right-padded / truncated.

  Truncation keeps the closing special token ([SEP] / <|endoftext|>), so EOS pooling
  (the last valid token) stays meaningful.
  """
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if not texts:
    return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
  enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                  return_attention_mask=True, return_token_type_ids=False)
  ids = np.asarray(enc["input_ids"], np.int32)
  mask = np.asarray(enc["attention_mask"], np.int32)
  assert ids.shape == (len(texts), max_len), ids.shape
  return ids, mask


def special_ids(tokenizer) -> dict:
  """-> dict(pad, mask, cls, sep, unk, vocab_size, all_special); ids are None when absent."""
  return dict(pad=tokenizer.pad_token_id, mask=tokenizer.mask_token_id,
              cls=tokenizer.cls_token_id if tokenizer.cls_token else tokenizer.bos_token_id,
              sep=tokenizer.sep_token_id if tokenizer.sep_token else tokenizer.eos_token_id,
              unk=tokenizer.unk_token_id, vocab_size=vocab_size(tokenizer),
              all_special=sorted(set(tokenizer.all_special_ids)))


def vocab_size(tokenizer) -> int:
  """Number of ids the tokenizer can emit (added tokens included)."""
  return len(tokenizer)
