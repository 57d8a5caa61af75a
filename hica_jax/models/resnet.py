"""Convolutional image tower (`model.image.arch="resnet"`), a from-scratch
alternative to the ViT with the same outputs.

A ResNet (He et al. 2016) narrowed for 64-px inputs and a few thousand
images: log2(patch_size) stages, each a stride-2 3x3 convolution (the first
one on the image itself) followed by `depth` basic residual blocks (two 3x3
convolutions). No full-resolution stem: like the ViT's conv stem it starts
with a stride-2 convolution, since a 3x3 convolution over the full 64x64
grid is among the costliest ops a small tower has on XLA:CPU. Channels
double per stage and end at `width`, so the last feature map is a
[H/p, W/p] grid of `width`-wide tokens: the same token grid as a ViT with
patch p, which the local (ROI / attention) terms read.

GroupNorm instead of BatchNorm: every step of every stage stays a pure
function of params and batch (no running statistics to carry, shard or
checkpoint), and self-supervised ResNets trained at small batch sizes
use it (BYOL's small-batch variant, there with weight standardisation,
which this tower leaves out). The last norm of each residual branch
starts at zero, so each block starts as act(x), its input passed through
(Goyal et al. 2017).

No pretrained layout has these params; they are trained from scratch.
"""
from typing import Any, Optional, Tuple

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hica_jax.models.vit import MAPHead, activation

# The pools this tower has: the mean of its tokens, or an attention probe.
RESNET_POOLS = ("gap", "map")


def _groups(channels: int) -> int:
  """GroupNorm groups: 8 where they divide, else the largest divisor below."""
  for g in (8, 4, 2):
    if channels % g == 0:
      return g
  return 1


class BasicBlock(nn.Module):
  """x + norm(conv(act(norm(conv(x))))) then act; channels kept."""
  act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [B, H, W, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    conv = lambda name: nn.Conv(c, (3, 3), padding="SAME", use_bias=False,
                                dtype=self.dtype, name=name)
    y = conv("conv1")(x)
    y = activation(self.act)(nn.GroupNorm(_groups(c), dtype=self.dtype,
                                          name="norm1")(y))
    y = conv("conv2")(y)
    y = nn.GroupNorm(_groups(c), dtype=self.dtype, name="norm2",
                     scale_init=nn.initializers.zeros)(y)
    return activation(self.act)(x + y)


class ResNet(nn.Module):
  """Residual conv tower with the ViT's interface.

  width: channels of the last stage (the token width); stage i of
  n = log2(patch_size) has width / 2**(n-1-i) channels (at least 8).
  depth: residual blocks per stage; stage_depths: blocks of each stage
  instead (one entry per stage), e.g. (0, 1, 1): no block at the first,
  widest grid, which costs more than half of the whole tower's step on
  XLA:CPU. pool: 'gap' (mean of the ln_post-ed tokens) or 'map' (attention
  probe, `heads` and `map_mlp_dim or mlp_dim`).
  """
  image_size: int = 64  # the config's; unused (no position embedding to size)
  patch_size: int = 8
  width: int = 96
  depth: int = 1
  stage_depths: Optional[Tuple[int, ...]] = None
  pool: str = "gap"
  act: str = "gelu"
  heads: int = 3
  mlp_dim: int = 192
  map_mlp_dim: Optional[int] = None
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images f32[B, H, W, C] -> dict(pooled [B, W], tokens [B, N, W], hidden [B, N, W]).

    N = (H/p) * (W/p). `tokens` are LayerNorm-ed (ln_post) like the ViT's;
    `hidden` is the last feature map before it. `train` is accepted for the
    ViT's interface: this tower has no dropout and no batch statistics.
    """
    del train
    chex.assert_rank(images, 4)
    if self.pool not in RESNET_POOLS:
      raise ValueError(f"image.pool={self.pool!r}: the resnet tower pools with "
                       f"one of {RESNET_POOLS}.")
    n = int(np.log2(self.patch_size))
    if 2 ** n != self.patch_size:
      raise ValueError(f"image.arch='resnet' needs a power-of-two patch_size, "
                       f"got {self.patch_size}.")
    b, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"image size {h}x{w} is not divisible by patch_size "
                       f"{self.patch_size}")
    widths = [max(self.width // 2 ** (n - 1 - i), 8) for i in range(n)]
    depths = (tuple(self.stage_depths) if self.stage_depths is not None
              else (self.depth,) * n)
    if len(depths) != n or min(depths) < 0:
      raise ValueError(f"image.stage_depths={self.stage_depths}: give {n} "
                       f"block counts >= 0, one per stage of patch_size "
                       f"{self.patch_size}.")
    act = activation(self.act)
    x = images.astype(self.dtype)
    block_cls = nn.remat(BasicBlock) if self.remat else BasicBlock
    for i, (c, stage_depth) in enumerate(zip(widths, depths)):
      x = nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                  dtype=self.dtype, name=f"down_{i}")(x)
      x = act(nn.GroupNorm(_groups(c), dtype=self.dtype, name=f"down_norm_{i}")(x))
      for j in range(stage_depth):
        x = block_cls(act=self.act, dtype=self.dtype, name=f"stage_{i}_block_{j}")(x)
    gh, gw = x.shape[1], x.shape[2]
    hidden = x.reshape(b, gh * gw, x.shape[-1])
    if hidden.shape[-1] != self.width:  # width below 8: stages stay at 8
      hidden = nn.Dense(self.width, dtype=self.dtype, name="proj_out")(hidden)
    normed = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype,
                          name="ln_post")(hidden)
    if self.pool == "map":
      pooled = MAPHead(self.heads, self.map_mlp_dim or self.mlp_dim, act=self.act,
                       ln_eps=self.ln_eps, dtype=self.dtype, name="map_head")(normed)
    else:
      pooled = normed.mean(axis=1)
    return dict(pooled=pooled, tokens=normed, hidden=hidden)
