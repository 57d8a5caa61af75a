"""Tests of hica_jax.losses (and the stage-1 losses in its sharded-equivalence
table): references, sharded equivalence, invariants."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hica_jax import contrastive
from hica_jax import losses
from hica_jax import pretrain_losses

NDEV = 8
B, D0, D, GRID, H, LP, K = 16, 6, 8, 2, 8, 4, 3
TOL = dict(rtol=1e-5, atol=1e-5)


def _mesh():
  assert jax.device_count() >= NDEV, "tests/conftest.py sets 8 CPU devices"
  return Mesh(np.array(jax.devices()[:NDEV]), ("data",))


def _close(a, b, **kw):
  kw = dict(TOL, **kw)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), **kw), a, b)


# ---------------------------------------------------------------------------
# A tiny "model": linear projections of fixed features, so gradients w.r.t.
# replicated parameters can be compared across single-device/shard_map/pmap.
# ---------------------------------------------------------------------------


def _problem(seed=0, b=B):
  rng = np.random.RandomState(seed)
  f32 = lambda *s: rng.randn(*s).astype(np.float32)
  has_roi = (np.arange(b) % 4 != 3).astype(np.float32)
  masks = np.zeros((b, H, H), np.float32)
  for i in np.flatnonzero(has_roi):
    r0, c0 = rng.randint(0, H - 2, 2)
    masks[i, r0:r0 + rng.randint(1, H - r0), c0:c0 + rng.randint(1, H - c0)] = 1
  phrase_id = np.where(has_roi > 0, rng.randint(0, 4, b), -1).astype(np.int32)
  lengths = rng.randint(1, LP + 1, b)
  phrase_mask = (np.arange(LP)[None] < lengths[:, None]).astype(np.int32)
  batch = {"img": f32(b, D0), "txt": f32(b, D0), "patch": f32(b, GRID ** 2, D0),
           "phr": f32(b, D0), "tok": f32(b, LP, D0),
           "label": rng.randint(0, K, b).astype(np.int32), "roi_mask": masks,
           "has_roi": has_roi, "phrase_id": phrase_id,
           "phrase_mask": phrase_mask}
  shared = {"desc": f32(7, D0),
            "desc_category": np.array([0, 0, 1, 1, 1, 2, 2], np.int32)}
  params = {"w_img": f32(D0, D) / 2, "w_txt": f32(D0, D) / 2,
            "t": np.float32(np.log(10.0)), "bias": np.float32(-2.0)}
  return params, batch, shared


def _outputs(params, batch, shared):
  s = jnp.minimum(jnp.exp(params["t"]), 100.0)
  img = lambda x: x @ params["w_img"]
  txt = lambda x: x @ params["w_txt"]
  return {"image_emb": img(batch["img"]), "patch_emb": img(batch["patch"]),
          "text_emb": txt(batch["txt"]), "phrase_emb": txt(batch["phr"]),
          "phrase_tokens": txt(batch["tok"]),
          "prototypes": losses.category_prototypes(
              txt(shared["desc"]), shared["desc_category"], K),
          "logit_scale": s, "logit_bias": params["bias"]}


def _weights(**kw):
  w = {"global": 1.0, "local": 0.5, "cross": 0.5, "beta": 0.1, "margin": 0.2,
       "local_mode": "roi", "label_aware": True, "chunk_size": None}
  w.update(kw)
  return w


def _term(name, chunk=None):
  """loss_fn(params, batch, shared, axis_name) -> f32[] for one term."""
  def fn(params, batch, shared, axis_name):
    o = _outputs(params, batch, shared)
    s = o["logit_scale"]
    if name == "global_clip":
      return losses.global_contrastive_loss(
          o["image_emb"], o["text_emb"], s, axis_name=axis_name,
          chunk_size=chunk)
    if name == "global_labels":
      return losses.global_contrastive_loss(
          o["image_emb"], o["text_emb"], s, batch["label"], axis_name,
          chunk_size=chunk)
    if name == "global_soft":
      return losses.global_contrastive_loss(
          o["image_emb"], o["text_emb"], s, batch["label"], axis_name,
          chunk_size=chunk, targets="soft")
    if name.startswith("sigmoid"):
      return losses.global_sigmoid_loss(
          o["image_emb"], o["text_emb"], s, o["logit_bias"],
          batch["label"] if name == "sigmoid_labels" else None, axis_name,
          chunk_size=chunk)
    if name == "local_roi":
      return losses.local_alignment_loss(
          o["patch_emb"], s, "roi", roi_mask=batch["roi_mask"],
          phrase_emb=o["phrase_emb"], phrase_id=batch["phrase_id"],
          has_roi=batch["has_roi"], axis_name=axis_name, chunk_size=chunk)
    if name == "local_attention":
      return losses.local_alignment_loss(
          o["patch_emb"], s, "attention", phrase_tokens=o["phrase_tokens"],
          phrase_mask=batch["phrase_mask"], phrase_id=batch["phrase_id"],
          has_roi=batch["has_roi"], axis_name=axis_name, chunk_size=chunk)
    if name == "cross":
      return losses.cross_category_loss(o["image_emb"], batch["label"],
                                        o["prototypes"], s, 0.1, 0.2,
                                        axis_name)
    if name.startswith("hica"):
      mode = "attention" if name == "hica_attention" else "roi"
      return losses.hica_loss(o, batch, _weights(local_mode=mode,
                                                  chunk_size=chunk),
                              axis_name)[0]
    if name == "cluster":
      logits = o["image_emb"][:, :K]
      return pretrain_losses.cluster_classification_loss(
          logits, batch["label"], K, axis_name=axis_name)
    if name == "mlm":
      logits = jnp.einsum("bld,vd->blv", o["phrase_tokens"], params["w_img"])
      targets = (batch["phrase_id"][:, None] + jnp.arange(LP)[None]) % D0
      return pretrain_losses.masked_lm_loss(logits, targets,
                                            batch["phrase_mask"], axis_name)
    if name == "causal":
      logits = jnp.einsum("bld,vd->blv", o["phrase_tokens"], params["w_img"])
      ids = (jnp.arange(LP)[None] + batch["label"][:, None]) % D0
      return pretrain_losses.causal_lm_loss(logits, ids, batch["phrase_mask"],
                                            axis_name)
    raise ValueError(name)
  return fn


# Every term unchunked, then chunked forms: (name, chunk_size).
TERMS = ([(t, None) for t in (
    "global_clip", "global_labels", "global_soft", "local_roi",
    "local_attention", "cross", "hica_roi", "hica_attention", "cluster",
    "mlm", "causal", "sigmoid_clip", "sigmoid_labels")]
         + [("global_clip", 3), ("global_labels", 1), ("global_labels", 5),
            ("global_soft", 3), ("local_roi", 1), ("local_roi", 3),
            ("local_roi", 5), ("local_attention", 3), ("local_attention", 5),
            ("hica_roi", 3), ("hica_attention", 5), ("sigmoid_clip", 3),
            ("sigmoid_labels", 5)])
TERM_IDS = [f"{n}-chunk{c}" for n, c in TERMS]
# Compared on 8 devices: every term, and hica_loss chunked in both modes.
SHARDED = list(range(13)) + [TERMS.index(("hica_roi", 3)),
                             TERMS.index(("hica_attention", 5)),
                             TERMS.index(("sigmoid_labels", 5))]
FEATURES = ("img", "txt", "patch", "phr", "tok")
# Tiny programs: compile time dominates, and LLVM -O0 halves it.
_FAST = {"xla_backend_optimization_level": 0}


def _split(batch):
  """(differentiable feature inputs, the rest: labels, masks, ids)."""
  return ({k: batch[k] for k in FEATURES},
          {k: v for k, v in batch.items() if k not in FEATURES})


def _stack(pairs):
  """[(value, grads)] -> (values [T], grads with a leading [T] axis)."""
  return (jnp.stack([v for v, _ in pairs]),
          jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g in pairs]))


def _values_and_grads(params, feats, rest, shared, terms=None,
                      axis_name=None, argnums=(0, 1)):
  """Each term's loss and gradient in one program (one compile).

  A separate backward pass per term, rather than jax.jacrev: the vmapped
  backward of the whole vector miscompiled on XLA:CPU (jax 0.10.2) for the
  chunked attention term, while every per-term gradient is exact.
  """
  out = []
  for i in (range(len(TERMS)) if terms is None else terms):
    fn = _term(*TERMS[i])
    out.append(jax.value_and_grad(
        lambda p, f: fn(p, dict(rest, **f), shared, axis_name),
        argnums)(params, feats))
  return _stack(out)


_single = jax.jit(_values_and_grads, compiler_options=_FAST)


def _row(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


@pytest.fixture(scope="module")
def reference():
  params, batch, shared = _problem()
  feats, rest = _split(batch)
  return (params, feats, rest, shared), _single(params, feats, rest, shared)


@pytest.fixture(scope="module")
def sharded(reference):
  """Losses and gradients of SHARDED terms computed three distributed ways."""
  (params, feats, rest, shared), _ = reference
  mesh = _mesh()
  out = {}

  # 1. grad taken outside shard_map (check_vma=False): params and inputs.
  def outside(params, feats):
    pairs = []
    for i in SHARDED:
      fn = functools.partial(_term(*TERMS[i]), axis_name="data")
      loss = lambda p, f: jax.shard_map(
          fn, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=P(),
          check_vma=False)(p, dict(rest, **f), shared)
      pairs.append(jax.value_and_grad(loss, (0, 1))(params, feats))
    return _stack(pairs)
  out["shard_map_outside"] = jax.jit(outside, compiler_options=_FAST)(
      params, feats)

  # 2. grad taken inside shard_map with check_vma=True: exact per device.
  def inside(p, f, r, sh):
    return _values_and_grads(p, f, r, sh, SHARDED, "data", argnums=0)
  out["shard_map_inside"] = jax.jit(jax.shard_map(
      inside, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()),
      out_specs=(P(), P()), check_vma=True), compiler_options=_FAST)(
          params, feats, rest, shared)

  # 3. pmap: per-device grads follow psum's transpose; pmean gives the exact
  # global-batch gradient (the usual data-parallel step).
  def pstep(p, f, r, sh):
    val, grads = _values_and_grads(p, f, r, sh, SHARDED, "data", argnums=0)
    return val, jax.lax.pmean(grads, "data")
  split = lambda t: jax.tree.map(
      lambda x: x.reshape((NDEV, -1) + x.shape[1:]), t)
  val, grads = jax.pmap(pstep, axis_name="data", in_axes=(None, 0, 0, None))(
      params, split(feats), split(rest), shared)
  out["pmap"] = (val[0], _row(grads, 0))
  return out


@pytest.mark.parametrize("mode", ["shard_map_outside", "shard_map_inside",
                                  "pmap"])
@pytest.mark.parametrize("k", range(len(SHARDED)),
                         ids=[TERM_IDS[i] for i in SHARDED])
def test_sharded_equals_single_device(reference, sharded, mode, k):
  """Loss and gradients on 8 devices equal the single-device global batch."""
  _, (ref_val, ref_grads) = reference
  i = SHARDED[k]
  val, grads = sharded[mode]
  assert np.isfinite(ref_val[i]) and float(ref_val[i]) > 0
  _close(val[k], ref_val[i])
  if mode == "shard_map_outside":  # (params, inputs) gradients
    _close(_row(grads, k), _row(ref_grads, i))
  else:  # parameter gradients of the per-device step
    _close(_row(grads, k), _row(ref_grads[0], i))


@pytest.mark.parametrize("i", [i for i, (_, c) in enumerate(TERMS) if c],
                         ids=[t for t, (_, c) in zip(TERM_IDS, TERMS) if c])
def test_chunked_equals_unchunked(reference, i):
  _, (val, grads) = reference
  j = TERMS.index((TERMS[i][0], None))
  _close(val[i], val[j])
  _close(_row(grads, i), _row(grads, j))


def test_global_without_labels_matches_transformers_clip():
  torch = pytest.importorskip("torch")
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(0)
  config = CLIPConfig(
      text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=12),
      vision_config=dict(hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         image_size=16, patch_size=8),
      projection_dim=8)
  model = CLIPModel(config).eval()
  with torch.no_grad():
    model.logit_scale.fill_(np.log(17.0))
  ids = torch.randint(0, 50, (6, 7))
  pixels = torch.randn(6, 3, 16, 16)
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
  scale = float(model.logit_scale.detach().exp())
  ours = losses.global_contrastive_loss(
      jnp.asarray(out.image_embeds.numpy()),
      jnp.asarray(out.text_embeds.numpy()), scale)
  np.testing.assert_allclose(float(ours), float(out.loss), rtol=1e-5,
                             atol=1e-5)
  # Un-normalised embeddings give the same loss: normalisation is internal.
  ours2 = losses.global_contrastive_loss(
      3.0 * jnp.asarray(out.image_embeds.numpy()),
      0.5 * jnp.asarray(out.text_embeds.numpy()), scale)
  np.testing.assert_allclose(float(ours2), float(out.loss), rtol=1e-5,
                             atol=1e-5)


def _shared_descriptor_batch(seed=0):
  """8 images of 3 classes, each paired with its class's one descriptor."""
  rng = np.random.RandomState(seed)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2], np.int32)
  desc = rng.randn(K, D).astype(np.float32)
  text = desc[labels]
  image = (desc[labels] + 0.8 * rng.randn(len(labels), D)).astype(np.float32)
  return jnp.asarray(image), jnp.asarray(text), jnp.asarray(labels)


def test_label_aware_lower_and_never_pushes_same_class_apart():
  image, text, labels = _shared_descriptor_batch()
  s = 10.0
  identity = losses.global_contrastive_loss(image, text, s)
  aware = losses.global_contrastive_loss(image, text, s, labels)
  assert float(aware) < float(identity) - 0.1

  # The loss depends on embeddings only through S = s * G U^T; the logits form
  # is the same function (known answer), so dL/dS is the gradient to inspect.
  unit = contrastive.l2_normalize
  logits = s * unit(image) @ unit(text).T
  _close(contrastive.contrastive_loss_from_logits(logits, labels), aware)
  same = np.asarray(labels[:, None] == labels[None, :])
  off_diag_same = same & ~np.eye(len(labels), dtype=bool)
  g_aware = jax.grad(contrastive.contrastive_loss_from_logits)(logits,
                                                             labels)
  assert np.all(np.asarray(g_aware)[same] <= 1e-7), (
      "label-aware gradient would lower a same-class similarity")
  # Identity targets push same-class (false negative) pairs apart.
  g_id = jax.grad(contrastive.contrastive_loss_from_logits)(logits)
  assert np.any(np.asarray(g_id)[off_diag_same] > 1e-3)
  # Random logits too, not just this batch: the property is structural.
  rnd = jax.random.normal(jax.random.key(3), logits.shape) * 5
  g_rnd = jax.grad(contrastive.contrastive_loss_from_logits)(rnd, labels)
  assert np.all(np.asarray(g_rnd)[same] <= 1e-7)


def test_soft_targets_equal_identity_when_descriptors_are_shared():
  """Known answer that motivates the 'multi_positive' default: with Q-target
  cross-entropy and one descriptor per class, loss and the gradient summed
  over identical texts equal plain CLIP's (the soft target changes nothing)."""
  image, text, labels = _shared_descriptor_batch(seed=1)
  f = lambda g, u, y: losses.global_contrastive_loss(g, u, 10.0, y,
                                                     targets="soft")
  v_soft, (gi_soft, gt_soft) = jax.value_and_grad(f, (0, 1))(image, text,
                                                               labels)
  v_id, (gi_id, gt_id) = jax.value_and_grad(f, (0, 1))(image, text, None)
  _close(v_soft, v_id)
  _close(gi_soft, gi_id)
  onehot = jax.nn.one_hot(labels, K).T
  _close(onehot @ gt_soft, onehot @ gt_id)


def test_batch_permutation_invariance(reference):
  """Permuting the batch leaves every loss (and parameter gradient) as is."""
  (params, feats, rest, shared), (val, jac) = reference
  perm = np.random.RandomState(0).permutation(B)
  permute = lambda t: jax.tree.map(lambda x: x[perm], t)
  pval, pjac = _single(params, permute(feats), permute(rest), shared)
  for i, name in enumerate(TERM_IDS):
    _close(pval[i], val[i], err_msg=name)
    _close(_row(pjac[0], i), _row(jac[0], i), err_msg=name)


def _edge_cases():
  params, batch, shared = _problem(seed=3)
  normal = dict(batch, has_roi=np.zeros(B, np.float32),
                roi_mask=np.zeros((B, H, H), np.float32),
                phrase_id=np.full(B, -1, np.int32))
  one_class = dict(batch, label=np.zeros(B, np.int32),
                   phrase_id=np.where(batch["has_roi"] > 0, 0, -1))
  capped = dict(params, t=np.float32(10.0))  # exp(10) clipped to 100
  # Embeddings aligned with their pair: huge margins at the cap.
  aligned = dict(batch, txt=batch["img"], phr=batch["img"],
                 tok=np.repeat(batch["img"][:, None], LP, 1))
  return {"all_normal": (params, normal, shared),
          "one_class": (params, one_class, shared),
          "scale_at_cap": (capped, aligned, shared),
          "cap_one_class": (capped, dict(aligned, label=one_class["label"]),
                            shared)}


@pytest.mark.parametrize("case", ["all_normal", "one_class", "scale_at_cap",
                                  "cap_one_class"])
def test_no_nan_or_inf_in_edge_cases(case):
  params, batch, shared = _edge_cases()[case]
  feats, rest = _split(batch)
  val, jac = _single(params, feats, rest, shared)
  for i, name in enumerate(TERM_IDS):
    for leaf in jax.tree.leaves((val[i], _row(jac, i))):
      assert np.all(np.isfinite(np.asarray(leaf))), (case, name)
  _, m = losses.hica_loss(_outputs(params, batch, shared), batch, _weights())
  assert all(np.isfinite(float(v)) for v in m.values())
  if case == "all_normal":
    assert float(m["local_count"]) == 0 and float(m["loss_local"]) == 0
    # No example has a phrase either, so the attention term is empty too.
    assert float(val[TERMS.index(("local_attention", None))]) == 0
  if case == "scale_at_cap":
    assert float(m["logit_scale"]) == 100.0


def test_roi_pooling_hand_computed():
  # 8x8 image, 2x2 grid of 4x4 patches; ROI rows 1..5, cols 2..4 crosses both
  # patch boundaries: covered pixels per patch 3x2, 3x1, 2x2, 2x1.
  mask = np.zeros((1, 8, 8), np.float32)
  mask[0, 1:6, 2:5] = 1
  weights = losses.roi_patch_weights(jnp.asarray(mask), (2, 2))
  _close(weights, np.array([[6, 3, 4, 2]]) / 16.0)
  patches = jnp.eye(4, 5)[None] * jnp.array([1.0, 2.0, 1.0, 1.0])[None, :,
                                                                     None]
  roi, mass = losses.roi_pool(patches, jnp.asarray(mask))
  expected = np.array([6, 6, 4, 2, 0], np.float64)  # weights * patch norms
  _close(roi[0], expected / np.linalg.norm(expected))
  _close(mass, [15 / 16])
  # A mask already at patch resolution is used as is.
  roi2, _ = losses.roi_pool(patches, weights.reshape(1, 2, 2))
  _close(roi2, roi)
  # Non-square grid passed explicitly: 8x8 mask onto 1x4 (8x2 patches).
  w14 = losses.roi_patch_weights(jnp.asarray(mask), (1, 4))
  _close(w14, np.array([[0, 10, 5, 0]]) / 16.0)
  with pytest.raises(ValueError, match="patch grid"):
    losses.roi_patch_weights(jnp.zeros((1, 7, 8)), (2, 2))
  with pytest.raises(ValueError, match="grid"):
    losses.roi_pool(jnp.zeros((1, 6, 3)), jnp.zeros((1, 6, 6)))


def test_attention_scores_match_naive_definition():
  """GLoRIA-style scores, against a loop that builds the context vectors."""
  rng = np.random.RandomState(0)
  patches, tokens = rng.randn(2, 4, 3), rng.randn(3, 2, 3)
  mask = np.array([[1, 1], [1, 0], [0, 1]])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  expected = np.zeros((2, 3))
  for i in range(2):
    for j in range(3):
      cos = []
      for t in np.flatnonzero(mask[j]):
        w, p = unit(tokens[j, t]), unit(patches[i])
        a = np.exp(4.0 * p @ w)
        c = (a / a.sum()) @ p
        cos.append(w @ c / np.linalg.norm(c))
      expected[i, j] = np.log(np.exp(5.0 * np.array(cos)).sum()) / 5.0
  got = losses.attention_scores(jnp.asarray(patches, jnp.float32),
                                jnp.asarray(tokens, jnp.float32),
                                jnp.asarray(mask), attn_scale=4.0, gamma=5.0)
  _close(got, expected)


def test_hica_loss_combines_terms_and_checks_keys():
  params, batch, shared = _problem(seed=4)
  o = _outputs(params, batch, shared)
  loss, m = losses.hica_loss(o, batch, _weights(**{"global": 1.0,
                                                   "local": 0.5,
                                                   "cross": 0.25}))
  _close(loss, m["loss_global"] + 0.5 * m["loss_local"]
         + 0.25 * m["loss_cross"])
  _close(m["loss_global"], _term("global_labels")(params, batch, shared, None))
  _close(m["loss_local"], _term("local_roi")(params, batch, shared, None))
  assert float(m["local_count"]) == batch["has_roi"].sum()
  with pytest.raises(KeyError, match="phrase_emb"):
    losses.hica_loss({k: v for k, v in o.items() if k != "phrase_emb"}, batch,
                     _weights())
  with pytest.raises(KeyError, match="unknown weights"):
    losses.hica_loss(o, batch, _weights(lambda_g=1.0))
  # A zero-weight term is skipped, so its inputs are not needed.
  _, m = losses.hica_loss({k: v for k, v in o.items() if k != "phrase_emb"},
                          batch, _weights(local=0.0))
  assert float(m["loss_local"]) == 0.0


def test_sigmoid_global_known_answer_and_hica_form():
  """global_sigmoid_loss equals the pairwise definition written out in numpy, its
  bias gradient is sum_ij (sigmoid(S_ij) - [positive]) / B, and hica_loss picks it
  with global_form='sigmoid'."""
  params, batch, shared = _problem(seed=6)
  o = _outputs(params, batch, shared)
  g = np.asarray(o["image_emb"], np.float64)
  u = np.asarray(o["text_emb"], np.float64)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  logits = float(o["logit_scale"]) * g @ u.T + float(params["bias"])
  y = batch["label"]
  for labels, pos in ((None, np.eye(B, dtype=bool)), (y, y[:, None] == y[None])):
    z = np.where(pos, 1.0, -1.0)
    want = np.log1p(np.exp(-z * logits)).sum() / B
    got = losses.global_sigmoid_loss(o["image_emb"], o["text_emb"],
                                     o["logit_scale"], o["logit_bias"], labels)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    db = jax.grad(lambda b: losses.global_sigmoid_loss(
        o["image_emb"], o["text_emb"], o["logit_scale"], b, labels))(
            jnp.float32(params["bias"]))
    sig = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(float(db), (sig - pos).sum() / B, rtol=1e-4)
  _, m = losses.hica_loss(o, batch, _weights(local=0.0, cross=0.0,
                                             global_form="sigmoid"))
  _close(m["loss_global"], _term("sigmoid_labels")(params, batch, shared, None))
  with pytest.raises(ValueError, match="global_form"):
    losses.hica_loss(o, batch, _weights(global_form="hinge"))


def test_class_phrases_key_the_local_term_by_label():
  """phrases='class': the attention term's positives are same-label pairs
  among the examples with a phrase, i.e. local_alignment_loss with the
  phrase ids replaced by the labels; 'roi' keys by phrase id."""
  params, batch, shared = _problem(seed=5)
  o = _outputs(params, batch, shared)
  w = _weights(**{"global": 0.0, "cross": 0.0, "local": 1.0,
                  "local_mode": "attention"})
  by_label = np.where(batch["phrase_id"] >= 0, batch["label"], -1)
  assert not np.array_equal(by_label, batch["phrase_id"])

  def local(keys):
    return losses.local_alignment_loss(
        o["patch_emb"], o["logit_scale"], "attention",
        phrase_tokens=o["phrase_tokens"], phrase_mask=batch["phrase_mask"],
        phrase_id=jnp.asarray(keys), has_roi=batch["has_roi"])

  got_class = losses.hica_loss(o, batch, dict(w, phrases="class"))[1]
  got_roi = losses.hica_loss(o, batch, w)[1]
  _close(got_class["loss_local"], local(by_label))
  _close(got_roi["loss_local"], local(batch["phrase_id"]))
  assert abs(float(got_class["loss_local"] - got_roi["loss_local"])) > 1e-4
