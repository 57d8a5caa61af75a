"""Smoke tests of the train-step benchmarks (bench/train_step.py, mfu.py,
profile_step.py) in their --tiny mode and of bench/matmul_dtypes.py: they
run, and their numbers are sane; the benchmark's hica-jax and PyTorch models
are the same model.

The tests run the scripts' main() in this process (8 fake CPU devices: the
benchmarks use the first one).
"""
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "bench")
sys.path.insert(0, BENCH)

import clip_setup  # noqa: E402  pylint: disable=g-import-not-at-top

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_analytic_flops_match_xla_cost_analysis():
  # XLA counts every matmul FLOP plus elementwise work and the optimiser:
  # a little above the analytic (matmul-only) count, never below.
  arch = clip_setup.preset("tiny")
  compiled = clip_setup.lower_clip_step(arch).compile()
  xla = clip_setup.xla_flops(compiled)
  analytic = clip_setup.train_step_flops(arch)["total"]
  assert xla is not None
  assert 1.0 <= xla / analytic < 1.10, (xla, analytic)


@pytest.mark.slow
def test_hica_and_torch_clip_are_the_same_model(tmp_path):
  """Same architecture and, given the same weights, the same loss."""
  from hica_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  arch = clip_setup.preset("tiny", batch=4)
  torch_runner = clip_setup.TorchRunner(arch)
  model = torch_runner.model
  model.save_pretrained(str(tmp_path))
  cfg = hf_import.model_config_from_hf(str(tmp_path))
  ours = clip_setup.hica_model_config(arch)
  for tower in ("image", "text"):
    for k, v in cfg[tower].items():
      if k in ours[tower]:
        assert ours[tower][k] == v, (tower, k, ours[tower][k], v)
  assert cfg["embed_dim"] == arch.embed_dim
  runner = clip_setup.HicaRunner(arch)
  params = hf_import.load_hf_params(str(tmp_path), runner.state.params)
  batch = clip_setup.synthetic_batch(arch)
  loss_jax = float(runner.loss_fn(params, batch)[0])
  with torch.no_grad():
    out = model(input_ids=torch_runner.ids, attention_mask=torch_runner.mask,
                pixel_values=torch_runner.pixels, return_loss=True)
  np.testing.assert_allclose(loss_jax, float(out.loss), rtol=2e-4, atol=2e-5)
  # hica-jax's text tower also carries its MLM head (stage 1) and the model
  # the sigmoid form's scalar logit_bias; both unused here.
  import jax  # pylint: disable=g-import-not-at-top
  mlm = sum(np.size(x) for k, v in params["params"]["text"].items()
            if k.startswith("mlm") for x in jax.tree.leaves(v))
  assert np.size(params["params"]["logit_bias"]) == 1
  assert runner.num_params == torch_runner.num_params + mlm + 1


def test_model_speedups_keep_gradients(monkeypatch):
  """vit.py's custom-VJP Dense matmul and erf GELU (the CPU speed-ups in
  BENCHMARKS.md, "Profile") give the gradients of flax's plain
  lax.dot_general and jax.nn.gelu(approximate=False)."""
  import jax  # pylint: disable=g-import-not-at-top
  from hica_jax.models import text  # pylint: disable=g-import-not-at-top
  from hica_jax.models import vit  # pylint: disable=g-import-not-at-top
  runner = clip_setup.HicaRunner(clip_setup.preset("tiny", batch=4))
  params, batch = runner.state.params, runner.args[0]

  def grads():
    lowered = jax.jit(jax.grad(lambda p: runner.loss_fn(p, batch)[0])).lower(
        params)
    return lowered.as_text(), lowered.compile()(params)

  fast_hlo, fast = grads()
  original = vit.activation

  def plain_activation(name):
    if name == "gelu":
      return lambda x: jax.nn.gelu(x, approximate=False)
    return original(name)

  monkeypatch.setattr(vit, "dense_dot_general", jax.lax.dot_general)
  monkeypatch.setattr(vit, "activation", plain_activation)
  monkeypatch.setattr(text, "activation", plain_activation)  # imported by name
  plain_hlo, plain = grads()
  assert "optimization_barrier" in fast_hlo
  assert "optimization_barrier" not in plain_hlo
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(fast))
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) < 1e-5 * scale


@pytest.mark.slow
def test_train_step_tiny_runs_every_system():
  import train_step  # pylint: disable=g-import-not-at-top
  out = train_step.main(["--tiny", "--systems",
                         "hica,hica_scan,hica_stage2,torch", "--rounds", "2"])
  (r,) = out["results"]
  assert set(r["systems"]) == {"hica", "hica_scan", "hica_stage2", "torch"}
  for s in r["systems"].values():
    assert s["images_per_s"] > 0 and np.isfinite(s["loss_after"])
    assert s["min"] <= s["median"] <= s["max"]
  assert r["systems"]["hica"]["speedup_vs_torch"] > 0


def test_mfu_tiny_is_a_fraction():
  import mfu  # pylint: disable=g-import-not-at-top
  out = mfu.main(["--tiny", "--rounds", "2"])
  (r,) = out["results"]
  hica = r["systems"]["hica"]
  # The tiny step's matmuls are no smaller than the tiny peak's, so on a
  # noisy 2-core machine a round can beat the peak (1.07 seen): only an
  # order-of-magnitude error (FLOPs or seconds miscounted) is a bug here.
  assert 0.0 < hica["mfu_min"] <= hica["mfu"] <= hica["mfu_max"] < 3.0
  assert hica["flops_per_s"] == pytest.approx(
      r["analytic_flops"]["total"] / hica["step_s"]["median"])
  assert 1.0 <= r["xla_over_analytic"] < 1.10
  assert r["peak_flops_per_s"]["median"] > 1e8


@pytest.mark.slow
def test_profile_tiny_breakdown(tmp_path):
  import profile_step  # pylint: disable=g-import-not-at-top
  out = profile_step.main(["--tiny", "--parts", "profile,compile",
                           "--steps", "1", "--trace_dir", str(tmp_path),
                           "--compile_archs", "default"])
  prof = out["profile"]
  assert os.path.isdir(prof["trace_dir"])
  assert prof["thunk_ms"] > 0 and prof["top_ops"]
  assert any("dot" in r["name"] for r in prof["kinds"]), prof["kinds"]
  assert abs(sum(r["share"] for r in prof["kinds"]) - 1.0) < 1e-6
  rows = out["compile"]
  assert {(r["config"], r["scan"]) for r in rows} == {("default", False),
                                                       ("default", True)}
  assert all(r["compile_s"] > 0 for r in rows)


@pytest.mark.slow
def test_gpu_preset_tiny_runs_on_cpu():
  """The GPU variant's code paths (bf16 compute, torch autocast) at tiny size."""
  import mfu  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  out = train_step.main(["--preset", "gpu", "--tiny", "--systems",
                         "hica,torch", "--rounds", "1", "--warmup", "0"])
  assert out["arch"]["dtype"] == "bfloat16"
  for s in out["results"][0]["systems"].values():
    assert np.isfinite(s["loss_after"])
  out = mfu.main(["--preset", "gpu", "--tiny", "--rounds", "1",
                  "--nominal_peak_tflops", "1"])
  assert 0.0 < out["results"][0]["systems"]["hica"]["mfu"]


def test_matmul_dtypes_rates():
  import matmul_dtypes  # pylint: disable=g-import-not-at-top
  rows = matmul_dtypes.main(["--sizes", "256", "--repeats", "2"])
  assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
  assert all(r["jax"] > 0 and r["torch"] > 0 for r in rows)


@pytest.mark.slow
def test_image_tower_step_tiny_times_every_tower(tmp_path):
  """Each tower's row: its parameters, positive times, stage 1's crops; the
  ResNet without a first-stage block has fewer parameters than with it."""
  import image_tower_step  # pylint: disable=g-import-not-at-top
  out = tmp_path / "towers.jsonl"
  rows = {r["tower"]: r for r in image_tower_step.main(
      ["--tiny", "--rounds", "1", "--out", str(out)])}
  assert set(rows) == {"vit", "resnet", "resnet_011"}
  assert rows["resnet_011"]["image_params"] < rows["resnet"]["image_params"]
  assert all(0 < r["min_s"] <= r["median_s"] <= r["max_s"]
             for r in rows.values())
  assert rows["vit"]["crops"][0][1:] == [32, 32, 1]
  assert len(out.read_text().splitlines()) == 3


def test_feature_readouts_of_a_resnet_tower():
  """bench/feature_readout.py: the stage means end with the mean of the
  tower's `hidden`, have each stage's width, and a 1x1 grid of the tokens is
  their mean; a grid cell is the mean of its own tokens only."""
  import jax  # pylint: disable=g-import-not-at-top
  import feature_readout  # pylint: disable=g-import-not-at-top
  from hica_jax.models.resnet import ResNet  # pylint: disable=g-import-not-at-top
  tower = ResNet(patch_size=8, width=32, stage_depths=(0, 1, 1))
  images = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 1))
  params = tower.init(jax.random.PRNGKey(1), images)["params"]
  out, state = tower.apply({"params": params}, images,
                           capture_intermediates=True,
                           mutable=["intermediates"])
  means = feature_readout.resnet_stage_means(tower, state["intermediates"])
  assert [m.shape for m in means] == [(3, 8), (3, 16), (3, 32)]
  np.testing.assert_allclose(means[-1], out["hidden"].mean(1), rtol=1e-5,
                             atol=1e-6)
  # The first stage has no block: its output is the activated norm.
  assert not np.allclose(means[0], 0)
  tokens = np.asarray(out["tokens"])                  # [3, 16, 32], 4x4 grid
  np.testing.assert_allclose(feature_readout.grid_means(tokens, 1),
                             tokens.mean(1), rtol=1e-6)
  grid = feature_readout.grid_means(tokens, 2).reshape(3, 4, 32)
  top_left = tokens.reshape(3, 4, 4, 32)[:, :2, :2].mean((1, 2))
  np.testing.assert_allclose(grid[:, 0], top_left, rtol=1e-6)
  with pytest.raises(ValueError, match="square grid"):
    feature_readout.grid_means(tokens, 3)


def test_pool_spreading_moves_the_boundary_where_the_pool_lies():
  """bench/feature_readout.py's pooled:pool_spreading: two arcs of
  unlabelled points, one labelled point at an end of each. The probe on
  the two alone cuts both arcs; spreading their labels along the arcs
  first puts more of each on its side; swapped labels swap every
  prediction."""
  import feature_readout  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import linear_probe  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators.env import EvalEnv  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def arc(centre, n, half=50):
    a = np.radians(centre + rng.uniform(-half, half, n))
    return np.stack([np.cos(a), np.sin(a)], -1) * (
        1 + 0.05 * rng.normal(size=(n, 1)))

  pool = np.concatenate([arc(180, 200), arc(0, 200)])
  test = np.concatenate([arc(180, 100), arc(0, 100)])
  truth = np.repeat([0, 1], 100)
  ends = np.radians([135, -45])
  support = np.stack([np.cos(ends), np.sin(ends)], -1)
  stats = EvalEnv.feature_stats(pool)
  alone = linear_probe.linear_probe_probs(support, np.array([0, 1]), test, 2,
                                          stats=stats)
  spread = feature_readout.pool_spreading_probs(support, np.array([0, 1]),
                                                pool, test, 2, stats)
  assert (alone.argmax(1) == truth).mean() < 0.7
  assert (spread.argmax(1) == truth).mean() > 0.75
  swapped = feature_readout.pool_spreading_probs(support, np.array([1, 0]),
                                                 pool, test, 2, stats)
  np.testing.assert_array_equal(swapped.argmax(1), 1 - spread.argmax(1))


def test_support_centred_probe_form_ignores_where_the_pool_is_centred():
  """bench/feature_readout.py's pooled:support_centred,no_intercept: a
  probe through the origin, centred at the balanced support set's mean,
  puts its boundary between the classes where the pool is 95% one class;
  centred at that pool's mean it cannot; and it does not move when every
  image's features shift by a vector the pool's statistics do not see."""
  import feature_readout  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators.env import EvalEnv  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def draw(n0, n1):
    x = np.concatenate([rng.normal([-1.0, 3.0], 0.5, (n0, 2)),
                        rng.normal([1.0, 3.0], 0.5, (n1, 2))])
    return x, np.repeat([0, 1], [n0, n1])

  pool, _ = draw(50, 950)
  support, sup_labels = draw(16, 16)
  test, truth = draw(200, 200)
  stats = EvalEnv.feature_stats(pool)

  def accuracy(form, shift=0.0):
    probs = feature_readout.probe_form_probs(
        form, support + shift, sup_labels, test + shift, 2, stats)
    return (probs.argmax(1) == truth).mean(), probs

  centred, probs = accuracy("pooled:support_centred,no_intercept")
  assert centred > 0.9
  assert accuracy("pooled:no_intercept")[0] < 0.8
  _, shifted_probs = accuracy("pooled:support_centred,no_intercept",
                              np.array([0.7, -2.0]))
  np.testing.assert_allclose(shifted_probs, probs, atol=1e-6)
