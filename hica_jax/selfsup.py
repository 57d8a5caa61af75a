"""Self-supervised stage-1 objectives: online clustering against prototypes.

Stage 1 trains the image tower with pseudo-labels from unsupervised
clustering. Instead of offline k-means every few hundred steps (DeepCluster),
the clustering here is online: a projection head scores every view against K
learnable prototypes, and the pseudo-label of one view is predicted from the
other views of the same image:

* SwAV (Caron et al. 2020): soft codes from a Sinkhorn-Knopp equipartition of
  the batch over the prototypes (the collapse guard), swapped prediction.
* DINO (Caron et al. 2021): codes from an EMA teacher, centred and sharpened
  (the collapse guards), cross-entropy over every (teacher view, other view).

Views come from `multi_crop` (global + local crops, grayscale-friendly
photometric jitter, blur, small rotations, optional speckle), all in JAX so
that it fuses into the jitted train step (bench/stage1_probe.py: under 5% of
a step on CPU). Every function is pure and jittable; batch sums take an
optional `axis_name` so that they equal the single-device values inside
`shard_map`.
"""
import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


# ----------------------------------------------------------------------------
# Multi-crop views.


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """Static description of the views of one image (hashable: a jit static)."""
  global_size: int = 64
  local_size: int = 32
  num_global: int = 2
  num_local: int = 4
  global_scale: tuple = (0.35, 1.0)    # crop area as a fraction of the image
  local_scale: tuple = (0.08, 0.35)
  aspect: tuple = (3 / 4, 4 / 3)
  rotate: float = 10.0                 # degrees, uniform in [-rotate, rotate]
  hflip: float = 0.0                   # probability; 0 for chest X-rays
  brightness: float = 0.2              # additive, on [0, 1] intensities
  contrast: float = 0.3                # multiplicative around the mean
  gamma: float = 0.3                   # log-uniform exponent range
  blur_prob: float = 0.5
  blur_sigma: tuple = (0.1, 1.5)       # in output pixels
  speckle: float = 0.0                 # multiplicative noise std (ultrasound)
  noise: float = 0.02                  # additive Gaussian noise std
  channels: int = 3


def _crop_coords(key, in_size, out_size, scale, spec):
  """Input-pixel coordinates f32[2, out, out] of one random resized crop."""
  ks = jax.random.split(key, 5)
  area = jax.random.uniform(ks[0], (), minval=scale[0], maxval=scale[1])
  log_ar = jax.random.uniform(ks[1], (), minval=math.log(spec.aspect[0]),
                              maxval=math.log(spec.aspect[1]))
  ar = jnp.exp(log_ar)
  w = jnp.minimum(jnp.sqrt(area * ar), 1.0)
  h = jnp.minimum(jnp.sqrt(area / ar), 1.0)
  centre = jax.random.uniform(ks[2], (2,)) * (1.0 - jnp.stack([h, w])) + (
      jnp.stack([h, w]) / 2)
  angle = jax.random.uniform(ks[3], (), minval=-spec.rotate,
                             maxval=spec.rotate) * (math.pi / 180)
  flip = jnp.where(jax.random.uniform(ks[4]) < spec.hflip, -1.0, 1.0)
  t = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / out_size - 0.5
  v, u = jnp.meshgrid(t * h, t * w * flip, indexing="ij")
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  y = cos * v - sin * u + centre[0]
  x = sin * v + cos * u + centre[1]
  return jnp.stack([y, x]) * in_size - 0.5


def _blur_matrix(sigma, size):
  """f32[size, size] row-normalised Gaussian blur along one axis."""
  i = jnp.arange(size, dtype=jnp.float32)
  k = jnp.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
  return k / k.sum(1, keepdims=True)


def _photometric(key, x, spec):
  """One view f32[S, S] in [0, 1] -> jittered, per-image standardised view."""
  ks = jax.random.split(key, 8)
  u = lambda k, lo, hi: jax.random.uniform(k, (), minval=lo, maxval=hi)
  x = jnp.clip(x, 0.0, 1.0) ** jnp.exp(u(ks[0], -spec.gamma, spec.gamma))
  mean = x.mean()
  x = (x - mean) * u(ks[1], 1 - spec.contrast, 1 + spec.contrast) + mean
  x = x + u(ks[2], -spec.brightness, spec.brightness)
  blur = _blur_matrix(u(ks[3], *spec.blur_sigma), x.shape[0])
  x = jnp.where(jax.random.uniform(ks[4]) < spec.blur_prob,
                blur @ x @ blur.T, x)
  if spec.speckle:
    x = x * (1.0 + u(ks[5], 0.0, spec.speckle)
             * jax.random.normal(ks[6], x.shape))
  x = x + spec.noise * jax.random.normal(ks[7], x.shape)
  return (x - x.mean()) / (x.std() + 1e-3)


def _views(key, images, n, size, scale, spec):
  """images f32[B, H, H] -> f32[n, B, size, size, C]."""
  b, in_size = images.shape[0], images.shape[1]

  def one(k, image):
    kc, kp = jax.random.split(k)
    coords = _crop_coords(kc, in_size, size, scale, spec)
    crop = jax.scipy.ndimage.map_coordinates(image, list(coords), order=1,
                                             mode="constant", cval=0.0)
    return _photometric(kp, crop, spec)

  keys = jax.random.split(key, n * b).reshape(n, b, -1)
  out = jax.vmap(jax.vmap(one, in_axes=(0, 0)), in_axes=(0, None))(
      keys, images)
  return jnp.broadcast_to(out[..., None], out.shape + (spec.channels,))


def multi_crop(key, images, spec):
  """Global and local views of a batch of grayscale images.

  Args:
    key: PRNG key. images: f32[B, H, H] intensities in [0, 1] (square).
    spec: CropSpec (static).
  Returns:
    (global f32[num_global, B, global_size, global_size, C],
     local f32[num_local, B, local_size, local_size, C]), each view
    standardised by its own mean and std like the evaluation images; local
    is None when num_local is 0.
  """
  chex.assert_rank(images, 3)
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"multi_crop needs square images, got {images.shape}")
  kg, kl = jax.random.split(key)
  glob = _views(kg, images, spec.num_global, spec.global_size,
                spec.global_scale, spec)
  loc = (_views(kl, images, spec.num_local, spec.local_size, spec.local_scale,
                spec) if spec.num_local else None)
  return glob, loc


# ----------------------------------------------------------------------------
# Projection head with prototypes.


def batch_standardise(x, axis_name=None, eps=1e-5):
  """x f32[N, D] -> per-feature zero mean, unit variance over the global batch."""
  n = _psum(jnp.float32(x.shape[0]), axis_name)
  mean = _psum(x.sum(0), axis_name) / n
  var = _psum(((x - mean) ** 2).sum(0), axis_name) / n
  return (x - mean) * jax.lax.rsqrt(var + eps)


class PrototypeHead(nn.Module):
  """[batch-standardise] -> MLP -> L2-normalised bottleneck -> cosine scores.

  x f32[N, D] -> f32[N, num_prototypes] in [-1, 1]: the prototypes are
  normalised in the forward pass (SwAV normalises them after each update,
  DINO weight-normalises its last layer with the gain fixed to 1: the same
  cosine scores). `batch_norm` standardises the input and hidden features
  over the batch (no running statistics: the head is dropped after stage 1):
  a tower trained from scratch gives every image nearly the same feature,
  so without it every score row is nearly the same, the Sinkhorn codes and
  the centred DINO targets are nearly uniform, and both losses sit at
  log(num_prototypes) (Kermany, conv tower, 400 steps).
  """
  num_prototypes: int = 256
  hidden: int = 256
  bottleneck: int = 64
  layers: int = 2
  batch_norm: bool = True
  axis_name: str = None

  @nn.compact
  def __call__(self, x, return_embedding=False):
    """Scores f32[N, K]; with return_embedding, (scores, embedding
    f32[N, bottleneck]) where the embedding is the L2-normalised bottleneck
    (what the SwAV queue stores)."""
    norm = ((lambda h: batch_standardise(h, self.axis_name))
            if self.batch_norm else (lambda h: h))
    x = norm(x)
    for i in range(self.layers - 1):
      x = jax.nn.gelu(norm(nn.Dense(self.hidden, name=f"mlp_{i}")(x)))
    x = nn.Dense(self.bottleneck, name=f"mlp_{self.layers - 1}")(x)
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    protos = self.param("prototypes", nn.initializers.normal(1.0),
                        (self.num_prototypes, self.bottleneck))
    scores = prototype_scores(protos, x)
    return (scores, x) if return_embedding else scores


def prototype_scores(prototypes, embedding):
  """Cosine scores f32[N, K] of normalised embeddings f32[N, D] against
  prototypes f32[K, D] (normalised here, so raw params may be passed)."""
  protos = prototypes / (jnp.linalg.norm(prototypes, axis=-1, keepdims=True)
                         + 1e-6)
  return embedding @ protos.T


# ----------------------------------------------------------------------------
# SwAV.


def sinkhorn(scores, eps=0.05, iters=3, axis_name=None):
  """Sinkhorn-Knopp soft assignment of a batch with equal cluster sizes.

  Args:
    scores: f32[B_local, K] prototype scores (no gradient flows through).
    eps: entropic regularisation (smaller: harder codes).
    iters: alternating normalisations.
    axis_name: mapped axis over which the batch is split.
  Returns:
    f32[B_local, K] codes: every row sums to 1 and, as iters grows, every
    column sums to B/K over the global batch B (equipartition).
  """
  chex.assert_rank(scores, 2)
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  k = scores.shape[1]
  b = _psum(jnp.float32(scores.shape[0]), axis_name)
  top = jnp.max(scores)
  if axis_name is not None:
    top = jax.lax.pmax(top, axis_name)
  q = jnp.exp((scores - top) / eps)
  q = q / _psum(q.sum(), axis_name)

  def body(_, q):
    q = q / (_psum(q.sum(0, keepdims=True), axis_name) * k)
    return q / (q.sum(1, keepdims=True) * b)

  return jax.lax.fori_loop(0, iters, body, q) * b


def swav_loss(scores, num_assign=2, temperature=0.1, eps=0.05, iters=3,
              axis_name=None, queue_scores=None):
  """Swapped prediction: each view predicts the Sinkhorn codes of the others.

  Args:
    scores: f32[V, B_local, K] prototype scores of V views of the same images
      (the first `num_assign` are the global views the codes come from).
    queue_scores: optional f32[num_assign, Q, K], scores of embeddings of
      earlier batches (SwAV's queue): Sinkhorn balances the clusters over
      the Q + B rows and the batch keeps its last B codes, so that
      equipartition is not forced on a batch smaller than the prototypes
      can fill.
  Returns:
    (loss f32[], codes f32[num_assign, B_local, K]): the mean over code views
    i and views v != i of the batch-mean cross-entropy
    -sum_k q_i log softmax(scores_v / temperature).
  """
  chex.assert_rank(scores, 3)
  v, b = scores.shape[:2]
  if not 1 <= num_assign <= v or v < 2:
    raise ValueError(f"swav_loss: num_assign={num_assign} with {v} views; "
                     "need 1 <= num_assign <= views and >= 2 views.")
  if queue_scores is None:
    codes = jnp.stack([sinkhorn(scores[i], eps, iters, axis_name)
                       for i in range(num_assign)])
  else:
    chex.assert_rank(queue_scores, 3)
    chex.assert_equal(queue_scores.shape[0], num_assign)
    codes = jnp.stack([sinkhorn(
        jnp.concatenate([queue_scores[i], scores[i]]), eps, iters,
        axis_name)[-b:] for i in range(num_assign)])
  return _cross_view_ce(codes, jax.nn.log_softmax(scores / temperature, -1),
                        axis_name), codes


def push_queue(queue, embeddings):
  """SwAV's queue after a batch: queue f32[G, Q, D], embeddings f32[G, B, D]
  -> f32[G, Q, D], the batch first and the oldest rows dropped."""
  chex.assert_rank([queue, embeddings], 3)
  return jnp.concatenate([embeddings.astype(queue.dtype), queue],
                         axis=1)[:, :queue.shape[1]]


def _cross_view_ce(targets, log_probs, axis_name):
  """Mean over (target view i, other view v) of the batch-mean CE."""
  ce = -jnp.einsum("ibk,vbk->iv", targets, log_probs)      # batch sums
  n_t, n_v = ce.shape
  off_diag = 1.0 - jnp.eye(n_t, n_v)
  count = _psum(jnp.float32(log_probs.shape[1]), axis_name)
  return _psum(jnp.sum(ce * off_diag), axis_name) / (off_diag.sum() * count)


# ----------------------------------------------------------------------------
# DINO.


def dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04,
              axis_name=None):
  """Self-distillation from a centred, sharpened teacher.

  Args:
    student: f32[Vs, B_local, K] student scores of all views.
    teacher: f32[Vt, B_local, K] teacher scores of the first Vt (global)
      views. center: f32[K] running mean of teacher scores.
  Returns:
    f32[]: mean over teacher views i and student views v != i of the batch
    mean of -sum_k softmax((t_i - center) / teacher_temp) log softmax(s_v /
    student_temp); no gradient reaches teacher or center.
  """
  chex.assert_rank([student, teacher, center], [3, 3, 1])
  chex.assert_equal_shape_suffix([student, teacher], 2)
  targets = jax.nn.softmax(
      jax.lax.stop_gradient(teacher - center) / teacher_temp, -1)
  return _cross_view_ce(targets, jax.nn.log_softmax(student / student_temp,
                                                    -1), axis_name)


def update_center(center, teacher, momentum=0.9, axis_name=None):
  """center * m + (1 - m) * mean teacher score over views and global batch.

  center f32[K], teacher f32[Vt, B_local, K] -> f32[K].
  """
  chex.assert_rank([center, teacher], [1, 3])
  total = _psum(teacher.sum((0, 1)), axis_name)
  count = _psum(jnp.float32(teacher.shape[0] * teacher.shape[1]), axis_name)
  return center * momentum + (1 - momentum) * jax.lax.stop_gradient(
      total / count)


def ema_update(teacher_params, student_params, momentum):
  """Teacher <- m * teacher + (1 - m) * student, leaf by leaf (same trees)."""
  return jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s,
                      teacher_params, student_params)


def cosine_ramp(step, total_steps, start, end):
  """start at step 0 -> end at total_steps, half-cosine (teacher momentum)."""
  frac = jnp.clip(step / jnp.maximum(total_steps, 1), 0.0, 1.0)
  return end - (end - start) * 0.5 * (1 + jnp.cos(jnp.pi * frac))


def linear_warmup(step, warmup_steps, start, end):
  """start -> end linearly over warmup_steps, then end (teacher temperature)."""
  frac = jnp.clip(step / jnp.maximum(warmup_steps, 1), 0.0, 1.0)
  return start + (end - start) * frac


# ----------------------------------------------------------------------------
# Monitoring.


def cluster_size_entropy(scores, axis_name=None):
  """Entropy of the hard cluster sizes over the global batch / log K.

  scores: f32[B_local, K] -> f32[] in [0, 1]: 1 when argmax assignments fill
  the K clusters equally, 0 when every image falls in one (collapse).
  """
  chex.assert_rank(scores, 2)
  k = scores.shape[1]
  sizes = _psum(jax.nn.one_hot(jnp.argmax(scores, -1), k).sum(0), axis_name)
  p = sizes / jnp.maximum(sizes.sum(), 1.0)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return ent / math.log(k)


def view_agreement(scores_a, scores_b, axis_name=None):
  """Fraction of images whose two views fall in the same cluster.

  scores_a, scores_b: f32[B_local, K] -> f32[] in [0, 1].
  """
  chex.assert_equal_shape([scores_a, scores_b])
  same = jnp.sum(jnp.argmax(scores_a, -1) == jnp.argmax(scores_b, -1))
  return _psum(same.astype(jnp.float32), axis_name) / _psum(
      jnp.float32(scores_a.shape[0]), axis_name)
