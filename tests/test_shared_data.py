"""The builders on the real images beside the repository (../shared/data).

Skipped, saying why, where that folder is absent. The images are never
copied into the repository; the build goes to a temporary folder.
"""
import json
import os

import pytest

from hica_jax import testing
from hica_jax.data import real

SHARED = os.path.join(testing.REPO, "..", "shared", "data")
BUSI = os.path.join(SHARED, "Dataset_BUSI_with_GT")


@pytest.mark.skipif(not os.path.isdir(BUSI),
                    reason=f"real BUSI images not found at {BUSI}")
def test_real_busi_builds_every_image_and_says_it_has_no_masks(tmp_path):
  _, summary = real.build_dataset("busi", BUSI, str(tmp_path))
  per_class = {c: sum(s["per_class"][c] for s in summary["splits"].values())
               for c in summary["categories"]}
  # ../shared/data/README.md: 311 benign, 135 malignant, 74 normal.
  assert per_class == {"benign": 311, "malignant": 135, "normal": 74}
  assert summary["images"] == 520 and not summary["skipped"]
  assert any("no mask files found" in n for n in summary["notes"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(BUSI),
                    reason=f"real BUSI images not found at {BUSI}")
def test_main_on_real_busi_classifies_every_category_and_says_why_no_local(
    tmp_path):
  """The README command on the real folder (at :tiny's sizes): the
  real-image defaults apply, all three categories are classified, the test
  split is the larger BUSI one, and the report says what the missing masks
  did to the local term."""
  from hica_jax import stages as stages_lib  # pylint: disable=g-import-not-at-top
  config = testing.config("busi", "tiny")
  config.data.root = BUSI
  config.eval.methods = ("hica", "pixel_probe")
  report = stages_lib.run(config, str(tmp_path / "w"))
  assert report["real_defaults"]["stage1.image_objective"] == "swav"
  # A run without the study stage does not report the study's fields.
  assert not [k for k in report["real_defaults"] if k.startswith("study.")]
  assert report["dataset"]["categories"] == ["benign", "malignant", "normal"]
  assert report["dataset"]["unseen"] == []
  test = sum(report["dataset"]["splits"]["test"].values())
  assert 0.3 * 520 <= test <= 0.4 * 520
  assert "has an ROI mask" in report["dataset"]["local_term"]
  # Local phrases come with ROIs, so no mode is suggested that cannot act.
  assert "Neither local mode can act" in report["dataset"]["local_term"]
  with open(tmp_path / "w" / "report.md") as f:
    assert report["dataset"]["local_term"] in f.read()
  # The bench tools that read such a run. A variant that changes nothing a
  # few-shot run reads must give a paired difference of exactly zero.
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(testing.REPO, "bench"))
  import fewshot_settings  # pylint: disable=g-import-not-at-top
  import stage1_curve  # pylint: disable=g-import-not-at-top
  summaries = fewshot_settings.main([
      "--family", "busi", "--config_arg", "tiny", "--data_root", BUSI,
      "--workdir", str(tmp_path / "w"), "--shots", "2", "--seeds", "2",
      "--variant", 'same={"stage2.log_every": 5}', "--text_tower", "minilm",
      "--out", str(tmp_path / "settings.jsonl")])
  delta = summaries[("same", 2)]["delta_vs_defaults"]
  assert delta["mean"] == 0.0 and delta["n"] == 2
  assert summaries[("text:minilm", 2)]["delta_vs_defaults"]["n"] == 2
  # That variant's start: stage 1's image tower, the pretrained text tower.
  _, swapped = testing.stage1_env_with_text_tower(
      "busi", "tiny", "minilm", BUSI, str(tmp_path / "w"))
  _, own = testing.stage1_env("busi", "tiny", BUSI, str(tmp_path / "w"))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(swapped.stage1["params"]["image"]),
                  jax.tree.leaves(own.stage1["params"]["image"])):
    np.testing.assert_array_equal(a, b)
  assert swapped.ctx.model_config.text.width == 384   # MiniLM's
  assert own.ctx.model_config.text.width != 384
  point = stage1_curve.read_point(str(tmp_path / "w"), "image_params")
  assert point["stage1_steps"] == config.stage1.steps
  assert set(point["few_shot"]["2"]) == {"hica", "pixel_probe"}
  # The tower size read from the provenance record equals the image
  # params of the model the run built.
  ctx, env = testing.stage1_env("busi", "tiny", BUSI, str(tmp_path / "w"))
  params = env.stage1
  tree = params.get("params", params)
  assert point["image_params"] == sum(
      np.size(x) for x in jax.tree.leaves(tree["image"]))
  # On real images stage 2 keeps the text tower's stage-1 weights
  # (config.real) and trains its projection and the image tower.
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  stage2 = context_lib.load_final_params(ctx, "stage2")
  tree2 = stage2.get("params", stage2)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(tree["text"], tree2["text"])
  assert not same(tree["text_proj"], tree2["text_proj"])
  assert not same(tree["image"], tree2["image"])
  # The inference bench's `text` rule is the method's prototype classifier:
  # it repeats the run's HiCA cells.
  import fewshot_inference  # pylint: disable=g-import-not-at-top
  cells = fewshot_inference.main([
      "--family", "busi", "--config_arg", "tiny", "--data_root", BUSI,
      "--workdir", str(tmp_path / "w"), "--shots", "2", "--seeds", "2",
      "--out", str(tmp_path / "inference.jsonl")])
  cached = stage1_curve.read_cells(str(tmp_path / "w"), ("hica",))
  for seed in range(2):
    np.testing.assert_allclose(
        cells[("text", 2, seed)]["balanced_accuracy"],
        cached[("hica", 2, seed)]["balanced_accuracy"], atol=1e-6)
  # The readout bench's `pooled` readout is the linear probe itself, and its
  # floor the run's pixel floor.
  import feature_readout  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import linear_probe  # pylint: disable=g-import-not-at-top
  readout = feature_readout.main([
      "--family", "busi", "--config_arg", "tiny", "--data_root", BUSI,
      "--workdir", str(tmp_path / "w"), "--shots", "2", "--seeds", "2",
      "--out", str(tmp_path / "readout" / "busi")])
  floor = stage1_curve.read_cells(str(tmp_path / "w"), ("pixel_probe",))
  rows = {(r["readout"], r["k"]): r for r in readout["rows"]}
  assert "stages" not in {r["readout"] for r in readout["rows"]}  # a ViT
  with open(tmp_path / "readout" / "busi.jsonl") as f:
    lines = [json.loads(line) for line in f]
  probes = []
  for seed in range(2):
    probe = linear_probe.cell(env, 2, seed)["metrics"]["balanced_accuracy"]
    np.testing.assert_allclose(lines[seed]["pooled"], probe, atol=1e-9)
    probes.append(probe)
    np.testing.assert_allclose(
        lines[seed]["floor"],
        floor[("pixel_probe", 2, seed)]["balanced_accuracy"], atol=1e-9)
  np.testing.assert_allclose(rows[("pooled", 2)]["mean"], np.mean(probes),
                             atol=1e-9)
