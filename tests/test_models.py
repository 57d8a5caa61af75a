"""HiCAModel: interface, padding masks, remat/scan equivalence, bf16, ViT variants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hica_jax import testing
from hica_jax.models import build_model
from hica_jax.models.vit import Encoder, parse_variant, resize_posemb, stack_blocks

IMAGE = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64)
TEXT = dict(width=32, depth=2, heads=4, mlp_dim=64, max_len=12)
VOCAB = 50


def config(**kw):
  cfg = {"embed_dim": 16, "image": dict(IMAGE), "text": dict(TEXT)}
  for k, v in kw.items():
    if isinstance(v, dict):
      cfg[k] = {**cfg[k], **v}
    else:
      cfg[k] = v
  return cfg


def inputs(b=3, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.randn(b, 32, 32, 3).astype(np.float32)
  ids = rng.randint(5, VOCAB, (b, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  for i, n in enumerate([12, 7, 3][:b]):
    ids[i, n:], mask[i, n:] = 0, 0
  return images, ids, mask


def np_init(model, seed=0):
  """Random params of the right shapes without compiling the RNG (slow to compile on CPU)."""
  images, ids, mask = inputs(1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, ids, mask)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: np.asarray(0.1 * rng.randn(*s.shape), s.dtype), shapes)


def jitted(model, method):
  """Jitted apply: one XLA compile is cheaper than op-by-op dispatch of a whole model."""
  fn = getattr(type(model), method) if isinstance(method, str) else method
  return jax.jit(lambda p, *a: model.apply(p, *a, method=fn))


def run(model, params, *args, method):
  return jitted(model, method)(params, *args)


def test_init_interface_and_shapes():
  model = build_model(config(scan=True), VOCAB)
  images, ids, mask = inputs()
  # Full init is traced (eval_shape); running it only costs RNG compile time on CPU.
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1], ids[:1], mask[:1])
  assert set(shapes["params"]) == {"image", "text", "image_proj", "text_proj", "logit_scale",
                                   "logit_bias"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  blocks = shapes["params"]["image"]["encoder"]["blocks"]
  assert blocks["attn"]["query"]["kernel"].shape == (2, 32, 32)
  scale_only = model.init(jax.random.key(0), method="get_logit_scale")
  np.testing.assert_allclose(scale_only["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
  params = np_init(model)
  g, p = run(model, params, images, method="encode_image")
  u, w = run(model, params, ids, mask, method="encode_text")
  assert g.shape == (3, 16) and p.shape == (3, 16, 16)
  assert u.shape == (3, 16) and w.shape == (3, 12, 16)
  assert run(model, params, ids, mask, method="mlm_logits").shape == (3, 12, VOCAB)
  assert run(model, params, images, method="image_features").shape == (3, 32)
  scale = lambda t: model.apply({"params": {**params["params"], "logit_scale": jnp.float32(t)}},
                                method="get_logit_scale")
  np.testing.assert_allclose(scale(np.log(1 / 0.07)), 1 / 0.07, rtol=1e-5)
  assert scale(10.0) == 100.0  # clipped


@pytest.mark.parametrize("text", [
    dict(causal=True, pool="eos", layout="pre", act="quick_gelu"),
    dict(causal=False, pool="mean", layout="post", act="gelu", type_vocab_size=2),
    dict(causal=False, pool="cls", layout="post", act="gelu"),
])
def test_text_respects_padding(text):
  model = build_model(config(text=text), VOCAB)
  params = np_init(model)
  _, ids, mask = inputs()
  encode_text = jitted(model, "encode_text")
  u, w = encode_text(params, ids, mask)
  junk = np.where(mask > 0, ids, 7).astype(np.int32)  # different tokens under the padding
  u2, w2 = encode_text(params, junk, mask)
  np.testing.assert_allclose(u, u2, atol=1e-5)
  valid = mask.astype(bool)
  np.testing.assert_allclose(w[valid], w2[valid], atol=1e-5)
  if text["pool"] == "eos":  # pooled = last valid token
    np.testing.assert_allclose(u[1], w[1, 6], atol=1e-6)
  if text["pool"] == "mean":
    np.testing.assert_allclose(u[2], w[2, :3].mean(0), atol=1e-5)  # projection is linear
  # Causal towers: earlier tokens do not see later ones; bidirectional ones do.
  later = ids.copy()
  later[0, 8] = 11 if ids[0, 8] != 11 else 12
  _, w3 = encode_text(params, later, mask)
  diff = np.abs(w3[0, :8] - w[0, :8]).max()
  assert diff < 1e-6 if text["causal"] else diff > 1e-4


def test_remat_and_scan_equal_outputs_and_grads():
  """Encoder: equal value and grads with remat/scan; full model: equal outputs with both."""
  x = np.random.RandomState(0).randn(2, 5, 32).astype(np.float32)
  bias = np.zeros((1, 1, 1, 5), np.float32)
  kw = dict(depth=2, heads=4, mlp_dim=64)
  base = Encoder(**kw)
  params = jax.tree.map(lambda s: np.asarray(0.1 * np.random.RandomState(1).randn(*s.shape),
                                             s.dtype),
                        jax.eval_shape(base.init, jax.random.key(0), x, bias))
  stack = lambda p: {"params": stack_blocks(p["params"])}

  def value_and_grad(enc, p):
    return jax.jit(jax.value_and_grad(lambda q: jnp.sum(jnp.sin(enc.apply(q, x, bias)))))(p)

  ref_val, ref_grad = value_and_grad(base, params)
  for remat, scan in ((True, False), (True, True)):
    val, grad = value_and_grad(Encoder(**kw, remat=remat, scan=scan),
                               stack(params) if scan else params)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    want = stack(ref_grad) if scan else ref_grad
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad, want)

  model = build_model(config(), VOCAB)
  full = np_init(model)
  stacked = jax.tree.map(lambda v: v, full)
  for tower in ("image", "text"):
    stacked["params"][tower]["encoder"] = stack_blocks(full["params"][tower]["encoder"])
  fast = build_model(config(remat=True, scan=True), VOCAB)
  images, ids, mask = inputs()
  for method, args in (("encode_image", (images,)), ("encode_text", (ids, mask))):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 run(fast, stacked, *args, method=method),
                 run(model, full, *args, method=method))


def test_bf16_compute_fp32_params():
  model16 = build_model(config(dtype="bfloat16"), VOCAB)
  shapes = jax.eval_shape(model16.init, jax.random.key(0), *inputs(1))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
  params = np_init(build_model(config(), VOCAB))
  images, ids, mask = inputs()
  for method, args in (("encode_image", (images,)), ("encode_text", (ids, mask))):
    ref = run(build_model(config(), VOCAB), params, *args, method=method)
    out = run(model16, params, *args, method=method)
    for a, b in zip(out, ref):
      assert a.dtype == jnp.float32
      rel = np.linalg.norm(a - b) / np.linalg.norm(b)
      assert 0 < rel < 0.05, rel  # bf16 rounding, not a different function


def test_gap_variant_and_other_resolution():
  model = build_model(config(image={"pool": "gap"}), VOCAB)
  params = np_init(model)
  assert "cls" not in params["params"]["image"]
  assert params["params"]["image"]["pos_embedding"].shape == (1, 16, 32)
  images = inputs()[0]
  out = run(model, params, images, method=lambda m, x: m.image(x))
  np.testing.assert_allclose(out["pooled"], out["tokens"].mean(1), atol=1e-5)
  # Params made for 32px run at 48px: position embeddings are interpolated.
  big = np.random.RandomState(1).randn(2, 48, 48, 3).astype(np.float32)
  g, p = run(model, params, big, method="encode_image")
  assert p.shape == (2, 36, 16) and np.isfinite(g).all()


def test_conv_stem_is_local():
  """stem='conv': log2(p) stride-2 convs; a patch token only sees its own
  neighbourhood (receptive field of three 3x3 stride-2 convs: 15 px)."""
  model = build_model(config(image={"stem": "conv"}), VOCAB)
  params = np_init(model)
  image = params["params"]["image"]
  assert "embedding" not in image
  # Channels grow to width/2 = 16 (at least 8), then a 1x1 conv to 32.
  assert [image[f"stem_{i}"]["kernel"].shape for i in range(3)] == [
      (3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 8, 16)]
  assert image["stem_out"]["kernel"].shape[-1] == 32
  tower = lambda m, x: m.image.__call__(x)
  images = inputs()[0]
  out = run(model, params, images, method=tower)
  assert out["tokens"].shape == (3, 16, 32)
  # Before the encoder mixes tokens: perturbing the bottom-right corner
  # leaves the stem output of the top-left patch unchanged.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from hica_jax.models import vit  # pylint: disable=g-import-not-at-top

  class Stem(nn.Module):

    @nn.compact
    def __call__(self, x):
      return vit.conv_stem(x, 8, 32, jnp.float32)

  stem = lambda p, x: Stem().apply(
      {"params": {k: v for k, v in p.items() if k.startswith("stem")}}, x)
  a = stem(image, images)
  corner = images.copy()
  corner[:, 24:, 24:] = 5.0
  b = stem(image, corner)
  np.testing.assert_allclose(a[:, 0, 0], b[:, 0, 0], atol=1e-6)
  assert np.abs(np.asarray(a[:, -1, -1]) - np.asarray(b[:, -1, -1])).max() > 1e-3


def test_resnet_tower_has_the_vit_token_grid():
  """arch='resnet': log2(p) stride-2 stages with channels doubling to
  `width`, the same [H/p * W/p, width] tokens and any input size."""
  model = build_model(config(image={"arch": "resnet", "pool": "gap", "depth": 1}),
                      VOCAB)
  params = np_init(model)
  image = params["params"]["image"]
  assert "encoder" not in image and "pos_embedding" not in image
  assert [image[f"down_{i}"]["kernel"].shape for i in range(3)] == [
      (3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32)]
  assert set(image) >= {f"stage_{i}_block_0" for i in range(3)}
  images = inputs()[0]
  out = run(model, params, images, method=lambda m, x: m.image(x))
  assert out["tokens"].shape == (3, 16, 32) and out["pooled"].shape == (3, 32)
  np.testing.assert_allclose(out["pooled"], out["tokens"].mean(1), atol=1e-5)
  g, p = run(model, params, images, method="encode_image")
  assert g.shape == (3, 16) and p.shape == (3, 16, 16)
  local = np.random.RandomState(1).randn(2, 16, 16, 3).astype(np.float32)
  g, p = run(model, params, local, method="encode_image")
  assert p.shape == (2, 4, 16) and np.isfinite(g).all()


def test_resnet_stage_depths_set_the_blocks_of_each_stage():
  """stage_depths=(0, 2, 1): no block on the first grid, two on the second,
  one on the last; the token grid is that of `depth`."""
  model = build_model(config(image={"arch": "resnet", "pool": "gap",
                                    "stage_depths": (0, 2, 1)}), VOCAB)
  params = np_init(model)
  blocks = sorted(k for k in params["params"]["image"] if "_block_" in k)
  assert blocks == ["stage_1_block_0", "stage_1_block_1", "stage_2_block_0"]
  out = run(model, params, inputs()[0], method=lambda m, x: m.image(x))
  assert out["tokens"].shape == (3, 16, 32)
  # A ViT is built without the field (unset, it is None).
  vit = build_model(config(image={"stage_depths": None}), VOCAB)
  assert "encoder" in np_init(vit)["params"]["image"]


def test_resnet_tower_with_attention_pool_and_a_narrow_width():
  """pool='map' pools with a learnt probe (not the token mean); a width
  below 8 keeps 8-channel stages and projects their tokens to `width`."""
  model = build_model(config(image={"arch": "resnet", "pool": "map", "depth": 1,
                                    "width": 6, "heads": 2}), VOCAB)
  params = np_init(model)
  image = params["params"]["image"]
  assert "map_head" in image and image["proj_out"]["kernel"].shape == (8, 6)
  out = run(model, params, inputs()[0], method=lambda m, x: m.image(x))
  assert out["tokens"].shape == (3, 16, 6) and out["pooled"].shape == (3, 6)
  assert np.abs(np.asarray(out["pooled"] - out["tokens"].mean(1))).max() > 1e-3


@pytest.mark.parametrize("image", [
    {"pool": "cls"}, {"pool": "gap"}, {"pool": "gap", "ln_after_pool": True},
    {"arch": "resnet", "pool": "gap", "depth": 1}])
def test_fold_feature_norm_standardises_pooled_features_and_tokens(image):
  """fold_feature_norm(params, m, s): the tower puts out (x - m) / s per
  feature, pooled and tokens alike, and so does encode_image's input to
  image_proj; s None centres only."""
  from hica_jax.models.hica_model import fold_feature_norm  # pylint: disable=g-import-not-at-top
  model = build_model(config(image=image), VOCAB)
  params = np_init(model)
  # A non-trivial ln_post, as training leaves it.
  ln = params["params"]["image"]["ln_post"]
  rng = np.random.RandomState(2)
  ln["scale"] = ln["scale"] + rng.rand(*ln["scale"].shape).astype(np.float32)
  ln["bias"] = ln["bias"] + rng.randn(*ln["bias"].shape).astype(np.float32)
  mean = rng.randn(32).astype(np.float32)
  std = (0.5 + rng.rand(32)).astype(np.float32)
  images = inputs()[0]
  tower = lambda m, x: m.image(x)
  before = run(model, params, images, method=tower)
  scale_before = np.array(ln["scale"])
  folded = fold_feature_norm(params, mean, std)
  after = run(model, folded, images, method=tower)
  for key in ("pooled", "tokens"):
    np.testing.assert_allclose(after[key], (before[key] - mean) / std,
                               atol=1e-4, rtol=1e-4)
  centred = run(model, fold_feature_norm(params, mean), images, method=tower)
  np.testing.assert_allclose(centred["pooled"], before["pooled"] - mean,
                             atol=1e-4)
  # The input params are untouched, and nothing but ln_post changes.
  np.testing.assert_array_equal(params["params"]["image"]["ln_post"]["scale"],
                                scale_before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, folded)
  assert sorted(jax.tree_util.keystr(k) for k, v in
                jax.tree_util.tree_leaves_with_path(changed) if v) == [
      "['params']['image']['ln_post']['bias']",
      "['params']['image']['ln_post']['scale']"]


def test_with_logit_scale_sets_the_multiplier_the_model_reads():
  """with_logit_scale(params, s): get_logit_scale gives s (clipped at the
  model's maximum), nothing else changes, and s <= 0 is refused."""
  from hica_jax.models.hica_model import with_logit_scale  # pylint: disable=g-import-not-at-top
  model = build_model(config(), VOCAB)
  params = np_init(model)
  before = np.array(params["params"]["logit_scale"])
  read = lambda p: float(run(model, p, method=lambda m: m.get_logit_scale()))
  assert read(with_logit_scale(params, 3.0)) == pytest.approx(3.0, rel=1e-6)
  assert read(with_logit_scale(params, 500.0)) == pytest.approx(100.0)
  np.testing.assert_array_equal(params["params"]["logit_scale"], before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params,
                         with_logit_scale(params, 3.0))
  assert [jax.tree_util.keystr(k) for k, v in
          jax.tree_util.tree_leaves_with_path(changed) if v] == [
      "['params']['logit_scale']"]
  with pytest.raises(ValueError, match="positive"):
    with_logit_scale(params, 0.0)


def test_resnet_block_starts_as_the_identity():
  """The residual branch's last norm starts at zero: at init a block is
  act(x), whatever its conv weights."""
  from hica_jax.models.resnet import BasicBlock  # pylint: disable=g-import-not-at-top
  from hica_jax.models.vit import activation  # pylint: disable=g-import-not-at-top
  x = np.random.RandomState(0).randn(2, 4, 4, 16).astype(np.float32)
  block = BasicBlock(act="gelu")
  params = block.init(jax.random.key(0), x)
  np.testing.assert_allclose(block.apply(params, x), activation("gelu")(x), atol=1e-6)
  # A trained branch changes it.
  params = jax.tree.map(lambda a: a + 0.5, params)
  assert np.abs(np.asarray(block.apply(params, x) - activation("gelu")(x))).max() > 1e-2


def test_resize_posemb():
  rng = np.random.RandomState(0)
  posemb = rng.randn(1, 1 + 16, 8).astype(np.float32)
  np.testing.assert_array_equal(resize_posemb(posemb, (4, 4), 1), posemb)  # identity
  const = np.ones((1, 1 + 16, 8), np.float32) * np.arange(8, dtype=np.float32)
  out = resize_posemb(const, (6, 5), 1)
  assert out.shape == (1, 1 + 30, 8)
  np.testing.assert_allclose(out, np.ones((1, 31, 8)) * np.arange(8), atol=1e-5)
  with pytest.raises(ValueError, match="square"):
    resize_posemb(rng.randn(1, 1 + 15, 8), (4, 4), 1)


def test_variants():
  assert parse_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, heads=12, patch_size=16)
  assert parse_variant("Ti/8")["width"] == 192 and parse_variant("L/14")["depth"] == 24
  assert parse_variant("S/32")["heads"] == 6
  model = build_model({"embed_dim": 8, "image": {"variant": "Ti/16", "depth": 1},
                       "text": {"variant": "minilm-l6", "depth": 1, "max_len": 12}}, 100)
  assert (model.image.width, model.image.depth, model.image.patch_size) == (192, 1, 16)
  assert (model.text.width, model.text.layout, model.text.pool) == (384, "post", "mean")
  with pytest.raises(ValueError, match="X/16"):
    parse_variant("X/16")


@pytest.mark.parametrize("bad, match", [
    (config(image={"widht": 3}), "config.model.image has unknown field"),
    (config(text={"pool": "max"}), "text.pool='max'"),
    (config(dtype="float16"), "dtype='float16'"),
    (config(image={"arch": "cnn"}), "arch='cnn'"),
    (config(image={"arch": "resnet", "pool": "cls"}), "pool='cls'"),
])
def test_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    model = build_model(bad, VOCAB)
    jax.eval_shape(model.init, jax.random.key(0), *inputs(1))


def test_dropout_only_in_train():
  model = build_model(config(dropout=0.3), VOCAB)
  params = np_init(model)
  images = inputs()[0]
  f = jax.jit(lambda p, x, train, key: model.apply(
      p, x, train, method=type(model).image_features, rngs={"dropout": key}),
              static_argnums=2)
  a = f(params, images, False, jax.random.key(0))
  b = f(params, images, False, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  c = f(params, images, True, jax.random.key(1))
  assert np.abs(c - a).max() > 1e-3


def test_principal_directions_known_axes():
  """Features spread 3 : 2 : 1 : 0.1 along four axes (shifted, rotated by a
  known orthogonal map): the top two directions are the first two rotated
  axes, unit and signed by their largest entry; more directions than
  features is an error naming the config field."""
  from hica_jax.models.hica_model import principal_directions  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  spread = rng.normal(size=(4000, 4)) * np.array([3.0, 2.0, 1.0, 0.1])
  rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  feats = spread @ rotation.T + 5.0
  dirs = principal_directions(feats, 2)
  assert dirs.shape == (4, 2)
  np.testing.assert_allclose(np.abs(dirs.T @ rotation[:, :2]), np.eye(2),
                             atol=0.05)
  np.testing.assert_allclose(np.linalg.norm(dirs, axis=0), 1.0, atol=1e-6)
  assert (dirs[np.abs(dirs).argmax(0), [0, 1]] > 0).all()
  with pytest.raises(ValueError, match="hica_proj_init"):
    principal_directions(feats, 5)


# ----------------------------------------------------------------------------
# Test-time crops (predict.view_stack, embed_images' crop_views).


def test_view_stack_takes_corners_and_centre():
  from hica_jax import predict  # pylint: disable=g-import-not-at-top
  assert predict.crop_boxes(8, (0.5,)) == [(0, 0, 4), (0, 4, 4), (4, 0, 4),
                                           (4, 4, 4), (2, 2, 4)]
  # Quadrants of constant value 0, 1, 2, 3: a quadrant's crop, resized
  # back, is that constant; the first view is the image itself.
  quad = np.zeros((8, 8), np.float32)
  quad[:4, 4:], quad[4:, :4], quad[4:, 4:] = 1, 2, 3
  images = np.stack([quad, 10 + quad])[..., None].repeat(3, -1)
  views = np.asarray(predict.view_stack(jnp.asarray(images), (0.5,)))
  assert views.shape == (6, 2, 8, 8, 3)
  np.testing.assert_array_equal(views[0], images)
  for v, value in zip(views[1:5], (0, 1, 2, 3)):
    np.testing.assert_allclose(v[0], value, atol=1e-6)
    np.testing.assert_allclose(v[1], 10 + value, atol=1e-6)
  # The centre crop straddles all four quadrants.
  assert set(np.unique(views[5, 0, :, :, 0]).round(3)) >= {0.0, 3.0}


def test_crop_views_average_each_views_embedding_and_features():
  from hica_jax import predict, sharding  # pylint: disable=g-import-not-at-top
  cfg, model, params = testing.tiny_model("chestxray")
  mesh = sharding.make_mesh()
  size = cfg.data.image_size
  images = np.random.default_rng(0).normal(
      size=(3, size, size, 3)).astype(np.float32)
  emb, feats = predict.embed_images(model, params, images, mesh, 4,
                                    crop_views=(0.75, 0.5))
  views = np.asarray(predict.view_stack(jnp.asarray(images), (0.75, 0.5)))
  assert views.shape[0] == 11
  raw, each = [], []
  for v in views:
    g, _ = model.apply(params, v, method=model.encode_image)
    raw.append(np.asarray(g))
    each.append(predict.embed_images(model, params, v, mesh, 4)[1])
  mean = np.mean(raw, 0)
  np.testing.assert_allclose(emb, mean / np.linalg.norm(mean, axis=-1,
                                                        keepdims=True),
                             atol=1e-5)
  np.testing.assert_allclose(feats, np.mean(each, 0), atol=1e-5)
  # No crops: the full image's own embedding.
  plain = predict.embed_images(model, params, images, mesh, 4)
  np.testing.assert_allclose(plain[1], each[0], atol=1e-6)
  assert np.abs(feats - each[0]).max() > 1e-3
