"""End-to-end: main on tiny synthetic data, report contract, resume, flags."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hica_jax import report as report_lib
from hica_jax import stages as stages_lib
from hica_jax import testing
from hica_jax import workdir as workdir_lib

REPO = testing.REPO


def tiny_config(family="chestxray", **stages):
  config = testing.config(family)
  if stages.get("stages"):
    config.stages = stages["stages"]
  return config


def _metric_lines(workdir, stage):
  with open(os.path.join(workdir, "metrics", f"{stage}.jsonl")) as f:
    return f.read().splitlines()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  report = stages_lib.run(tiny_config(), workdir)
  return workdir, report


def test_report_contract(finished_run):
  workdir, report = finished_run
  with open(os.path.join(workdir, "report.json")) as f:
    on_disk = json.load(f)
  report_lib.validate(on_disk)
  assert on_disk["config_name"] == "chestxray_fewshot"
  ds = on_disk["dataset"]
  # Every category is classified unless the config holds some out.
  assert ds["unseen"] == [] and len(ds["categories"]) == 4
  assert set(ds["splits"]) >= {"train", "val", "test"}
  for counts in ds["splits"].values():
    assert set(ds["categories"]) <= set(counts)
  assert on_disk["stages"]["stage1"]["steps"] == 6
  assert on_disk["stages"]["stage2"]["steps"] == 6
  assert sorted(on_disk["few_shot"]) == ["1", "2"]
  for methods in on_disk["few_shot"].values():
    for method, res in methods.items():
      assert res["n_seeds"] == (1 if method == "zero_shot" else 2)
      assert 0.0 <= res["balanced_accuracy"]["mean"] <= 1.0
  for k in on_disk["few_shot"]:
    # Every configured evaluator, the raw-pixel floor included.
    assert set(on_disk["few_shot"][k]) == set(tiny_config().eval.methods)
  zs = on_disk["zero_shot"]
  assert 0.0 <= zs["accuracy"] <= 1.0
  assert on_disk["evaluation"]["computed"] == on_disk["evaluation"]["cells"]
  assert os.path.exists(os.path.join(workdir, "report.md"))
  assert len(_metric_lines(workdir, "stage1")) >= 3
  # The code behind the report and behind each stage it loaded.
  code = on_disk["code"]
  assert set(code) == {"report", "stage1", "stage2"}
  for stage in ("stage1", "stage2"):
    assert code[stage] == workdir_lib.read_record(workdir, stage)["code"]
  assert code["report"]["libraries"]["numpy"] == np.__version__


def test_all_label_references_fit_every_train_label(finished_run):
  """The report's all-label rows: the frozen probe and the pixel floor
  refitted here from the train split's own labels, each C chosen here by
  5-fold cross-validation, give the same C and figures, on every seen
  train image; the stage-2 model's row is stage2_eval."""
  from sklearn.metrics import balanced_accuracy_score  # pylint: disable=g-import-not-at-top
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import predict  # pylint: disable=g-import-not-at-top
  from hica_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import env as env_lib  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import linear_probe  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import pixel_probe  # pylint: disable=g-import-not-at-top
  workdir, report = finished_run
  config = tiny_config()
  ctx = context_lib.build_context(config, workdir)
  env = env_lib.EvalEnv(ctx, context_lib.load_final_params(ctx, "stage1"))
  rows = report["all_labels"]
  train = sum(report["dataset"]["splits"]["train"].values())
  assert {r["n_train"] for r in rows.values()} == {train}
  assert rows["stage2_model"]["metrics"] == report["stage2_eval"]
  source = ctx.data.source("train")
  order = [ctx.data.categories.index(c) for c in ctx.tables.classes]
  labels = np.asarray([order.index(y) for y in source.labels()])
  images = pipeline.eval_arrays(source, np.arange(len(source)),
                                ctx.preprocessor(train=False))["image"]
  feats = predict.embed_images(ctx.model, env.stage1, images, ctx.mesh,
                               8)[1]
  stats = feats.mean(0), feats.std(0) + 1e-6
  # Each C chosen by its own 5-fold score (cross_val_score, not the grid
  # search the cells run), first of the ties as the grid search keeps.
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import StratifiedKFold, cross_val_score  # pylint: disable=g-import-not-at-top
  def best_c(x):
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = [cross_val_score(LogisticRegression(C=c, max_iter=2000), x,
                              labels, scoring="balanced_accuracy",
                              cv=folds).mean()
              for c in linear_probe.ALL_LABELS_C]
    return linear_probe.ALL_LABELS_C[int(np.argmax(scores))]
  c_probe = best_c(linear_probe.probe_inputs(feats, stats))
  c_pixels = best_c(pixel_probe.pixel_features(images,
                                               config.eval.pixel_size))
  assert rows["linear_probe"]["c"] == c_probe
  assert rows["pixel_probe"]["c"] == c_pixels
  want = {
      "linear_probe": linear_probe.linear_probe_probs(
          feats, labels, env.frozen["feats"], env.num_classes, c=c_probe,
          stats=stats),
      "pixel_probe": pixel_probe.pixel_probe_probs(
          images, labels, env.seen_images, env.num_classes,
          config.eval.pixel_size, c=c_pixels)}
  for name, probs in want.items():
    np.testing.assert_allclose(
        rows[name]["metrics"]["balanced_accuracy"],
        balanced_accuracy_score(env.seen_labels, probs.argmax(1)), atol=1e-6)
  with open(os.path.join(workdir, "report.md")) as f:
    assert "## Trained on the train split's labels" in f.read()


def test_second_run_skips_finished_stages(finished_run):
  workdir, _ = finished_run
  before = {s: _metric_lines(workdir, s) for s in ("stage1", "stage2")}
  config = tiny_config()
  config.stages = ("stage1", "stage2")
  stages_lib.run(config, workdir)
  after = {s: _metric_lines(workdir, s) for s in ("stage1", "stage2")}
  assert before == after


def test_rerun_rewrites_the_report_from_cached_cells(finished_run):
  workdir, first = finished_run
  report = stages_lib.run(tiny_config(), workdir)
  assert report["evaluation"]["computed"] == 0
  assert report["evaluation"]["cached"] == first["evaluation"]["cells"]
  assert report["few_shot"] == first["few_shot"]
  assert report["zero_shot"] == first["zero_shot"]


def test_stage1_only_then_full_run_does_not_repeat_stage1(tmp_path):
  workdir = str(tmp_path)
  stages_lib.run(tiny_config(stages=("stage1",)), workdir)
  stage1_lines = _metric_lines(workdir, "stage1")
  assert not os.path.exists(os.path.join(workdir, "metrics", "stage2.jsonl"))
  config = tiny_config()
  config.stages = ("stage1", "stage2")
  stages_lib.run(config, workdir)
  assert _metric_lines(workdir, "stage1") == stage1_lines
  assert _metric_lines(workdir, "stage2")


def test_unknown_stage_fails_clearly(tmp_path):
  config = tiny_config(stages=("stage1", "stage3"))
  with pytest.raises(ValueError, match="stage3"):
    stages_lib.run(config, str(tmp_path))


def test_mistyped_override_fails_before_any_work(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "hica_jax.main",
       "--config", os.path.join(REPO, "configs", "chestxray_fewshot.py"),
       "--config.stage2.optim.lrr=1", f"--workdir={workdir}"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr
  assert not workdir.exists()


def test_misspelled_config_argument_fails_listing_the_known_ones(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "hica_jax.main",
       "--config", os.path.join(REPO, "configs", "chestxray_fewshot.py") +
       ":tiyn", f"--workdir={workdir}"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert "['tiyn']" in proc.stderr and "known: tiny" in proc.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_swav_queue_enters_sinkhorn_and_resumes_exactly(tmp_path):
  """With a queue, it joins the Sinkhorn from queue_start (once full), is
  checkpointed with the state, and a run resumed mid-way (queue in use)
  trains the same steps as the uninterrupted one."""
  config = tiny_config(stages=("stage1",))
  config.stage1.image_objective = "swav"
  # tiny: batch 16, 6 steps, checkpoints every 3; the queue holds 2 batches.
  config.stage1.swav.update(dict(queue_length=32, queue_start=3))
  config.stage1.log_every = 1
  workdir = str(tmp_path / "full")
  stages_lib.run(config, workdir)
  records = [r for r in map(json.loads, _metric_lines(workdir, "stage1"))
             if "queue_in_use" in r]
  # Metrics are logged after the update: record `step` ran as step - 1.
  assert sorted(r["step"] for r in records) == [1, 2, 3, 4, 5, 6]
  for r in records:
    assert r["queue_in_use"] == float(r["step"] - 1 >= 3), r
  losses = {r["step"]: r["loss"] for r in records}

  # As if stopped after the step-3 checkpoint: resume and compare.
  from hica_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed_dir)
  ckpt_lib.unmark_final(resumed_dir, "stage1")
  shutil.rmtree(os.path.join(ckpt_lib.stage_dir(resumed_dir, "stage1"), "6"))
  stages_lib.run(config, resumed_dir)
  resumed = {r["step"]: r["loss"] for r in map(
      json.loads, _metric_lines(resumed_dir, "stage1")) if "loss" in r}
  for step in (4, 5, 6):
    np.testing.assert_allclose(resumed[step], losses[step], rtol=1e-5)


@pytest.mark.slow
def test_swav_stage1_trains_prototypes_without_reclustering(tmp_path,
                                                            monkeypatch):
  config = tiny_config(stages=("stage1",))
  config.stage1.image_objective = "swav"
  config.stage1.pool_fraction = 0.5
  workdir = str(tmp_path)
  from hica_jax.training import stage1  # pylint: disable=g-import-not-at-top
  pools, read = [], []
  unlabelled_pool = stage1.unlabelled_pool
  def recording_pool(indices, fraction, seed):
    pools.append(np.asarray(indices))
    return unlabelled_pool(indices, fraction, seed)
  train_dataset = stage1.pipeline.train_dataset
  def recording(source, indices, *args, **kwargs):
    read.append(np.asarray(indices))
    return train_dataset(source, indices, *args, **kwargs)
  monkeypatch.setattr(stage1, "unlabelled_pool", recording_pool)
  monkeypatch.setattr(stage1.pipeline, "train_dataset", recording)
  stages_lib.run(config, workdir)
  # It trained on half the seen train images: the seeded sample.
  (every,), (indices,) = pools, read
  assert len(indices) == round(len(every) / 2) and len(every) > 8
  assert set(indices) < set(every) and np.all(np.diff(indices) > 0)
  np.testing.assert_array_equal(
      indices, unlabelled_pool(every, 0.5, config.seed))
  assert not np.array_equal(indices, unlabelled_pool(every, 0.5,
                                                     config.seed + 1))
  records = [json.loads(line) for line in _metric_lines(workdir, "stage1")]
  logged = [r for r in records if "loss_cluster" in r]
  assert logged and all(np.isfinite(r["loss_cluster"]) for r in logged)
  for r in logged:
    assert 0.0 <= r["cluster_entropy"] <= 1.0
    assert 0.0 <= r["view_agreement"] <= 1.0
  # No k-means pass: nothing logs the DeepCluster cluster statistics.
  assert not any("nmi_prev" in r or "cluster_max_frac" in r for r in records)
  # The stage records the objective it was trained with.
  from hica_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ckpt_lib.stage_dir(workdir, "stage1"),
                         "provenance.json")) as f:
    inputs = json.load(f)["inputs"]
  assert inputs["stage1.image_objective"] == "swav"
  assert inputs["stage1.pool_fraction"] == 0.5


@pytest.mark.parametrize("mode", ["roi", "attention"])
def test_local_term_note_says_no_mode_can_act_without_masks(mode):
  """A real build gives local phrases only with ROIs, so without masks the
  report says the local term did nothing in either mode, names the mode,
  and suggests no mode that cannot act; with masks, or with the term off,
  it says nothing."""
  import types  # pylint: disable=g-import-not-at-top
  config = testing.config("busi", "tiny")
  config.stage2.loss.local_mode = mode
  def data(with_roi):
    summary = {"splits": {"train": {"with_roi": with_roi}},
               "masks": {"mask_files": 0}}
    return types.SimpleNamespace(builder=types.SimpleNamespace(
        read_summary=lambda: summary))
  note = stages_lib.local_term_note(config, data(0))
  assert f"(mode '{mode}') contributed nothing" in note
  assert "Neither local mode can act" in note
  assert "local_mode=attention" not in note
  assert stages_lib.local_term_note(config, data(3)) is None
  config.stage2.loss.local_weight = 0.0
  assert stages_lib.local_term_note(config, data(0)) is None
  # Synthetic builders keep no build summary: nothing to say.
  assert stages_lib.local_term_note(
      config, types.SimpleNamespace(builder=object())) is None


def test_local_term_note_names_the_classes_that_class_phrases_reach():
  import types  # pylint: disable=g-import-not-at-top
  from hica_jax.data import descriptors  # pylint: disable=g-import-not-at-top
  config = testing.config("busi", "tiny")
  config.stage2.loss.update(dict(local_mode="attention", phrases="class"))
  summary = {"splits": {"train": {"with_roi": 0}}, "masks": {"mask_files": 0}}
  data = types.SimpleNamespace(
      builder=types.SimpleNamespace(read_summary=lambda: summary),
      bank=descriptors.load_bank("busi"),
      seen=["benign", "malignant", "normal"])
  note = stages_lib.local_term_note(config, data)
  assert "every image of benign, malignant with a bank phrase" in note
  assert "contributed nothing" not in note
