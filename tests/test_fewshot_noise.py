"""Few-shot support sampling and descriptor-bank noise."""
import copy

import numpy as np
import pytest

from hica_jax.data import descriptors
from hica_jax.data import fewshot
from hica_jax.data import noise

LABELS = np.repeat([0, 1, 2], [10, 6, 3])


def test_support_is_balanced_seeded_and_nested():
  s = fewshot.sample_support(LABELS, 3, seed=0)
  assert s.dtype == np.int64 and np.all(np.diff(s) > 0)
  assert np.bincount(LABELS[s], minlength=3).tolist() == [3, 3, 3]
  np.testing.assert_array_equal(s, fewshot.sample_support(LABELS, 3, seed=0))
  assert any(not np.array_equal(s, fewshot.sample_support(LABELS, 3, seed=k))
             for k in range(1, 6))
  # K-shot sets grow by prefix: the 1-shot set is inside the 2-shot set.
  for seed in range(5):
    one = set(fewshot.sample_support(LABELS, 1, seed).tolist())
    two = set(fewshot.sample_support(LABELS, 2, seed).tolist())
    assert one < two


def test_support_is_disjoint_from_excluded():
  test = np.arange(0, 19, 3)  # Leaves class 2 (16..18) two examples.
  for seed in range(10):
    s = fewshot.sample_support(LABELS, 2, seed, exclude_indices=test)
    assert not set(s.tolist()) & set(test.tolist())
    assert np.bincount(LABELS[s], minlength=3).tolist() == [2, 2, 2]


def test_support_classes_subset():
  s = fewshot.sample_support(LABELS, 2, 0, classes=[2, 0])
  assert sorted(set(LABELS[s].tolist())) == [0, 2] and len(s) == 4


def test_support_short_class_errors_or_takes_all():
  with pytest.raises(ValueError, match=r"class 2 has 3 available .* k=4"):
    fewshot.sample_support(LABELS, 4, 0)
  with pytest.warns(UserWarning, match="class 2 has 3"):
    s = fewshot.sample_support(LABELS, 4, 0, on_short="all")
  assert np.bincount(LABELS[s]).tolist() == [4, 4, 3]
  # Exclusion can make a class short too.
  with pytest.raises(ValueError, match="class 2 has 1 available"):
    fewshot.sample_support(LABELS, 2, 0, exclude_indices=[16, 17])
  with pytest.raises(ValueError, match="class 5 has no examples"):
    fewshot.sample_support(LABELS, 1, 0, classes=[0, 5])
  with pytest.raises(ValueError, match="k"):
    fewshot.sample_support(LABELS, 0, 0)
  with pytest.raises(ValueError, match="on_short"):
    fewshot.sample_support(LABELS, 1, 0, on_short="some")


# ----------------------------------------------------------------------------
# Noise.


@pytest.fixture(params=["kermany", "kermany3", "busi", "rsna"])
def bank(request):
  return descriptors.load_bank(request.param)


def test_banks_meet_the_contract(bank):
  for cat, entry in bank["categories"].items():
    assert len(entry["sentences"]) >= 5, cat
    assert len(set(entry["sentences"])) == len(entry["sentences"])
  assert set(bank["unseen"]) <= set(bank["categories"])


def test_roi_classes_have_phrases():
  for name, cats in (("busi", ["benign", "malignant"]),
                     ("rsna", ["pneumonia"])):
    b = descriptors.load_bank(name)
    for c in cats:
      assert len(b["categories"][c]["phrases"]) >= 3, (name, c)


def test_rate_zero_is_identity(bank):
  before = copy.deepcopy(bank)
  assert noise.corrupt_bank(bank, 0.0, seed=3) == bank
  assert bank == before
  rng = np.random.default_rng(0)
  s = "dense lobar consolidation with air bronchograms"
  assert noise.drop_words(s, 0.0, rng) == s
  assert noise.add_typos(s, 0.0, rng) == s


def test_corruption_is_seeded_and_grows_with_rate(bank):
  before = copy.deepcopy(bank)
  a = noise.corrupt_bank(bank, 0.3, seed=1)
  assert a == noise.corrupt_bank(bank, 0.3, seed=1)
  assert a != noise.corrupt_bank(bank, 0.3, seed=2)
  assert bank == before  # The input is not modified.

  def changed(b):
    return sum(x != y for c in bank["categories"]
               for x, y in zip(bank["categories"][c]["sentences"],
                               b["categories"][c]["sentences"]))

  total = sum(len(e["sentences"]) for e in bank["categories"].values())
  fractions = [np.mean([changed(noise.corrupt_bank(bank, r, s))
                        for s in range(5)]) / total for r in (0.1, 0.5, 1.0)]
  assert fractions[0] < fractions[1] <= fractions[2]
  assert fractions[2] == 1.0
  for c in bank["categories"]:  # Phrases are kept by default.
    assert a["categories"][c]["phrases"] == bank["categories"][c]["phrases"]


def test_drop_words():
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(200)]
  out = noise.drop_words(" ".join(words), 0.3, rng).split()
  assert 100 < len(out) < 180
  assert out == [w for w in words if w in set(out)]  # Order kept.
  assert len(noise.drop_words("a b c", 1.0, rng).split()) == 1


def test_typos_swap_or_delete_one_character():
  rng = np.random.default_rng(0)
  for _ in range(50):
    t = noise.typo("consolidation", rng)
    if len(t) == len("consolidation"):
      assert sorted(t) == sorted("consolidation") and t != "consolidation"
    else:
      assert len(t) == len("consolidation") - 1
  out = noise.add_typos("opacity in the left lower lobe", 1.0, rng).split()
  assert len(out) == 6 and out != "opacity in the left lower lobe".split()


def test_swap_takes_sentences_from_other_classes():
  bank = descriptors.load_bank("busi")
  swapped = noise.swap_sentences(bank, 1.0, np.random.default_rng(0))
  for c, entry in swapped["categories"].items():
    others = {s for o, e in bank["categories"].items() if o != c
              for s in e["sentences"]}
    assert all(s in others for s in entry["sentences"])
  out = noise.corrupt_bank(bank, 1.0, 0, kinds=("swap",))
  assert out["categories"]["normal"]["sentences"] != bank["categories"][
      "normal"]["sentences"]


def test_bad_rates_and_kinds():
  bank = descriptors.load_bank("busi")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    noise.corrupt_bank(bank, 1.5, 0)
  with pytest.raises(ValueError, match="unknown noise kinds"):
    noise.corrupt_bank(bank, 0.1, 0, kinds=("shuffle",))
