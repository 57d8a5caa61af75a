"""Vision Transformer image tower, and the transformer encoder shared with the text towers.

Layout follows CLIP / HF ViT so that pretrained weights map one to one:
patch conv -> [class token] -> + position embedding -> [ln_pre] -> pre-LN blocks
-> ln_post. Post-LN placement (CLIP-compatible): CLIP applies `post_layernorm`
to the class token only; we apply the same LayerNorm to every token, so the
pooled embedding equals CLIP's pooled output exactly and the patch tokens are
normalised with the same statistics (the MaskCLIP / dense-CLIP convention; HF
ViTModel's final `layernorm` is applied to all tokens in the same way).

Encoder param layout: `encoder/block_{i}/...`, or with `scan=True`
`encoder/blocks/...` with a leading [depth] axis (see `stack_blocks`).
"""
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# big_vision sizes: name -> (width, depth, mlp_dim, heads).
VIT_SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}

NEG_INF = -1e9  # additive attention bias; finite so fully masked rows stay NaN-free


def parse_variant(variant: str) -> dict:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, heads=12, patch_size=16)."""
  size, _, patch = variant.partition("/")
  if size not in VIT_SIZES or not patch.isdigit():
    raise ValueError(
        f"image.variant={variant!r}: expected '<size>/<patch>' with size in "
        f"{sorted(VIT_SIZES)} and an integer patch, e.g. 'B/16'.")
  width, depth, mlp_dim, heads = VIT_SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads,
              patch_size=int(patch))


def activation(name: str):
  """HF `hidden_act` names -> jax functions (exact erf GELU for 'gelu' as in torch)."""
  if name == "gelu":
    # torch's formula. jax.nn.gelu(approximate=False) goes through erfc, which
    # XLA:CPU evaluates with an exp and two selects per element (bench/
    # profile_step.py: -2% of the CPU train step); equal to it within 1e-6.
    return lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))
  if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"act={name!r}: expected one of gelu, quick_gelu, gelu_new, relu.")


def _barrier(a):
  """On CPU, keeps XLA from folding a neighbouring transpose into a dot."""
  return jax.lax.optimization_barrier(a) if jax.default_backend() == "cpu" else a


@jax.custom_vjp
def _dense_matmul(x, w):
  return jnp.dot(x, w)


def _dense_matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _dense_matmul_bwd(res, g):
  x, w = res
  k, n = w.shape
  x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
  # dW = x^T g contracts the token axis, the major one of both operands.
  # XLA:CPU's YNNPACK dots do not take a transposed lhs and the fallback runs
  # at about half the speed; transposing the narrower operand explicitly (a
  # copy) makes every dot canonical (BENCHMARKS.md, "Profile").
  if k <= n:
    dw = jnp.dot(_barrier(x2.T), g2)
  else:
    dw = _barrier(jnp.dot(_barrier(g2.T), x2)).T
  return jnp.dot(g, w.T), dw.astype(w.dtype)


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """nn.Dense's dot_general: x[..., K] @ w[K, N] with the faster backward above."""
  if (rhs.ndim == 2 and precision is None and preferred_element_type is None
      and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
      and not any(dimension_numbers[1])):
    return _dense_matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (HF layout)."""
  heads: int
  dtype: Any = jnp.float32
  dropout: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, bias):
    """x: [B, L, W]; bias: f32[B or 1, 1, L or 1, L] additive -> [B, L, W]."""
    b, l, w = x.shape
    if w % self.heads:
      raise ValueError(f"width {w} is not divisible by heads {self.heads}")
    dh = w // self.heads
    dense = lambda name: nn.Dense(w, dtype=self.dtype, name=name,
                                  dot_general=dense_dot_general)
    # [B, heads, L, dh]: batch-major operands make both einsums plain batched
    # dots (XLA:CPU otherwise adds strided copies around them; -16% time of
    # the attention core, fwd+bwd, BENCHMARKS.md "Profile").
    split = lambda t: t.reshape(b, l, self.heads, dh).transpose(0, 2, 1, 3)
    q = split(dense("query")(x)) * (dh ** -0.5)
    k = split(dense("key")(x))
    v = split(dense("value")(x))
    # Logits and softmax in fp32 for bf16 stability.
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout)(weights, deterministic=self.deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    return dense("out")(out.transpose(0, 2, 1, 3).reshape(b, l, w))


class MlpBlock(nn.Module):
  mlp_dim: int
  act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1",
                 dot_general=dense_dot_general)(x)
    x = activation(self.act)(x)
    return nn.Dense(w, dtype=self.dtype, name="fc2",
                    dot_general=dense_dot_general)(x)


class EncoderBlock(nn.Module):
  """One transformer block. layout 'pre' (CLIP, ViT) or 'post' (BERT).

  Returns (x, None) so that it can be scanned over layers.
  """
  heads: int
  mlp_dim: int
  act: str = "gelu"
  layout: str = "pre"
  ln_eps: float = 1e-5
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    attn = SelfAttention(self.heads, dtype=self.dtype, dropout=self.dropout,
                         deterministic=self.deterministic, name="attn")
    mlp = MlpBlock(self.mlp_dim, act=self.act, dtype=self.dtype, name="mlp")
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    if self.layout == "pre":
      x = x + drop(attn(ln("ln1")(x), bias))
      x = x + drop(mlp(ln("ln2")(x)))
    elif self.layout == "post":
      x = ln("ln1")(x + drop(attn(x, bias)))
      x = ln("ln2")(x + drop(mlp(x)))
    else:
      raise ValueError(f"layout={self.layout!r}: expected 'pre' or 'post'.")
    return x, None


class Encoder(nn.Module):
  """`depth` EncoderBlocks, optionally rematerialised per block and/or scanned."""
  depth: int
  heads: int
  mlp_dim: int
  act: str = "gelu"
  layout: str = "pre"
  ln_eps: float = 1e-5
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x, bias):
    """x: [B, L, W]; bias: additive attention bias broadcastable to [B, H, L, L]."""
    block_cls = EncoderBlock
    if self.remat:
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan)
    kw = dict(heads=self.heads, mlp_dim=self.mlp_dim, act=self.act,
              layout=self.layout, ln_eps=self.ln_eps, dropout=self.dropout,
              deterministic=self.deterministic, dtype=self.dtype)
    if self.scan:
      blocks = nn.scan(block_cls, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=self.depth)
      x, _ = blocks(**kw, name="blocks")(x, bias)
    else:
      for i in range(self.depth):
        x, _ = block_cls(**kw, name=f"block_{i}")(x, bias)
    return x


def stack_blocks(encoder_params: dict) -> dict:
  """{'block_0': t0, ..., 'block_{n-1}'} -> {'blocks': t stacked on axis 0} (scan layout)."""
  n = len([k for k in encoder_params if k.startswith("block_")])
  if n != len(encoder_params):
    raise ValueError(f"unexpected encoder params {sorted(encoder_params)}")
  blocks = [encoder_params[f"block_{i}"] for i in range(n)]
  return {"blocks": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)}


def unstack_blocks(encoder_params: dict) -> dict:
  """Inverse of `stack_blocks`; identity on an unscanned layout."""
  if "blocks" not in encoder_params:
    return dict(encoder_params)
  stacked = encoder_params["blocks"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  return {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}


def cubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bicubic interpolation weights, as torch's interpolate(mode='bicubic',
  align_corners=False, size=n_out): Keys kernel a=-0.75, edge indices clamped.

  Matching torch makes our interpolated position embeddings equal HF's
  `interpolate_pos_encoding` (jax.image.resize uses a=-0.5).
  """
  a = -0.75

  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  frac = src - base
  m = np.zeros((n_out, n_in), np.float64)
  for k in (-1, 0, 1, 2):
    idx = np.clip(base + k, 0, n_in - 1).astype(int)
    np.add.at(m, (np.arange(n_out), idx), kernel(frac - k))
  return m.astype(np.float32)


def resize_posemb(posemb, new_grid, num_prefix: int):
  """Bicubic resize of a square position-embedding grid (torch-compatible, see above).

  posemb: [1, P + g*g, W] (P prefix tokens, e.g. the class token) -> [1, P + gh*gw, W].
  Identity (returns the input) when the grid already has the requested size.
  """
  posemb = jnp.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  n = grid.shape[1]
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f"position embedding has {n} grid tokens, which is not a square grid")
  gh, gw = new_grid
  if (gh, gw) == (g, g):
    return posemb
  w = grid.shape[-1]
  grid = jnp.asarray(grid, jnp.float32).reshape(g, g, w)
  grid = jnp.einsum("ih,jv,hvw->ijw", cubic_resize_matrix(g, gh), cubic_resize_matrix(g, gw),
                    grid, precision="highest")
  return jnp.concatenate([prefix, grid.reshape(1, gh * gw, w).astype(posemb.dtype)], axis=1)


def conv_stem(images, patch_size, width, dtype):
  """[B, H, W, C] -> [B, H/p, W/p, width]: stride-2 3x3 convs (LayerNorm, GELU)
  with channels growing to width/2, then a 1x1 conv to width. Params under
  `stem_{i}`, `stem_norm_{i}`, `stem_out` (no pretrained layout has them)."""
  n = int(np.log2(patch_size))
  if 2 ** n != patch_size:
    raise ValueError(f"image.stem='conv' needs a power-of-two patch_size, got "
                     f"{patch_size}.")
  x = images
  for i in range(n):
    ch = max(width // 2 ** (n - i), 8)
    x = nn.Conv(ch, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                dtype=dtype, name=f"stem_{i}")(x)
    x = nn.LayerNorm(dtype=dtype, name=f"stem_norm_{i}")(x)
    x = jax.nn.gelu(x)
  return nn.Conv(width, (1, 1), dtype=dtype, name="stem_out")(x)


class MAPHead(nn.Module):
  """Multihead attention pooling (SigLIP / timm `attn_pool`): a learnt probe attends
  over the tokens, then a pre-LN residual MLP; returns the probe's output."""
  heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [B, L, W] -> [B, W]."""
    b, l, w = x.shape
    dh = w // self.heads
    probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, w))
    dense = lambda name: nn.Dense(w, dtype=self.dtype, name=name)
    q = dense("query")(jnp.broadcast_to(probe, (b, 1, w)).astype(x.dtype))
    q = q.reshape(b, 1, self.heads, dh) * (dh ** -0.5)
    k = dense("key")(x).reshape(b, l, self.heads, dh)
    v = dense("value")(x).reshape(b, l, self.heads, dh)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), -1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, 1, w)
    y = dense("out")(y)
    h = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln")(y)
    y = y + MlpBlock(self.mlp_dim, act=self.act, dtype=self.dtype, name="mlp")(h)
    return y[:, 0]


class ViT(nn.Module):
  """ViT image tower.

  pool: 'cls' (the class token, CLIP/ViT), 'gap' (mean of the patch tokens) or
  'map' (attention pooling head `map_head`, SigLIP). class_token: whether a class
  token is prepended (default: pool == 'cls'; timm/open_clip 'gap' towers keep
  one). ln_after_pool: for 'gap', ln_post(mean(x)) (timm fc_norm, open_clip
  final_ln_after_pool) instead of mean(ln_post(x)). `tokens` are ln_post(x) either way.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  pool: str = "cls"
  act: str = "quick_gelu"
  ln_pre: bool = True
  patch_bias: bool = False
  ln_eps: float = 1e-5
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan: bool = False
  # "patch": one p x p conv (CLIP/ViT, what pretrained weights have); "conv":
  # log2(p) stride-2 3x3 convs then a 1x1 (Xiao et al. 2021, "Early
  # convolutions help transformers see better"): the locality prior a
  # from-scratch ViT lacks on a few hundred images.
  stem: str = "patch"
  class_token: Optional[bool] = None
  ln_after_pool: bool = False
  map_mlp_dim: Optional[int] = None  # 'map' head MLP width (default mlp_dim)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images f32[B, H, W, 3] -> dict(pooled [B, W], tokens [B, N, W], hidden [B, T, W]).

    `tokens` are the ln_post-normalised patch tokens (N = H/p * W/p); `hidden` is
    the last encoder state before ln_post, class token included (HF last_hidden_state
    for CLIP).
    """
    chex.assert_rank(images, 4)
    if self.pool not in ("cls", "gap", "map"):
      raise ValueError(f"image.pool={self.pool!r}: expected 'cls', 'gap' or 'map'.")
    has_cls = self.pool == "cls" if self.class_token is None else self.class_token
    if self.pool == "cls" and not has_cls:
      raise ValueError("image.pool='cls' needs image.class_token=True.")
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    if self.stem == "patch":
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                  use_bias=self.patch_bias, dtype=self.dtype, name="embedding")(
                      images.astype(self.dtype))
    elif self.stem == "conv":
      x = conv_stem(images.astype(self.dtype), p, self.width, self.dtype)
    else:
      raise ValueError(f"image.stem={self.stem!r}: expected 'patch' or 'conv'.")
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, self.width)
    num_prefix = 1 if has_cls else 0
    if num_prefix:
      cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], 1)
    posemb = self.param("pos_embedding", nn.initializers.normal(0.02),
                        (1, num_prefix + self.grid ** 2, self.width))
    # Runs at a different resolution than the params were made for: interpolate.
    x = x + resize_posemb(posemb, (gh, gw), num_prefix).astype(x.dtype)
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_pre")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    bias = jnp.zeros((1, 1, 1, x.shape[1]), jnp.float32)
    hidden = Encoder(depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
                     act=self.act, layout="pre", ln_eps=self.ln_eps,
                     dropout=self.dropout, deterministic=not train, dtype=self.dtype,
                     remat=self.remat, scan=self.scan, name="encoder")(x, bias)
    ln_post = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_post")
    normed = ln_post(hidden)
    if self.pool == "cls":
      pooled = normed[:, 0]
    elif self.pool == "map":
      pooled = MAPHead(self.heads, self.map_mlp_dim or self.mlp_dim, act=self.act,
                       ln_eps=self.ln_eps, dtype=self.dtype, name="map_head")(normed)
    elif self.ln_after_pool:
      pooled = ln_post(hidden[:, num_prefix:].mean(axis=1))
    else:
      pooled = normed[:, num_prefix:].mean(axis=1)
    return dict(pooled=pooled, tokens=normed[:, num_prefix:], hidden=hidden)
