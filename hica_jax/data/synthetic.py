"""Procedural chest-X-ray-like and breast-ultrasound-like data, as tfds builders.

The built-in default data of every run. Two families:
- "chestxray": grayscale radiograph look (body, lungs, heart, spine, ribs,
  clavicles, vessels) with lobar consolidation, interstitial opacities or a
  pleural effusion inside the lungs.
- "busi": speckled ultrasound look (skin, fat, fibroglandular tissue, muscle,
  Cooper ligaments, fat lobules) with oval/circumscribed, irregular/spiculated
  or anechoic masses.

The category structure comes from the descriptor bank
`banks/synthetic_<family>.json`: a category with local phrases is a lesion
class; each phrase is one lesion variant, rendered by `_CHEST_LESIONS` /
`_BUSI_LESIONS` below, and is the example's `phrase` verbatim. A category
without phrases is normal (no ROI, all-zero mask).

Class evidence is local: only the lesion (inside its mask, at its margin, and
the posterior acoustic column behind an ultrasound mass) depends on the label. Anatomy size
and position, brightness, contrast, gamma, blur, noise and distractors (rib
crossings, granulomas, nipple shadows, lead wires; fat lobules, ligaments) are
drawn from one distribution for every class. `difficulty` in [0, 1] lowers
lesion contrast, raises noise and makes the shape/texture parameters of the
classes overlap more.

Generation is vectorised numpy, seeded per (seed, family, split) and
deterministic. Records are written by a `tfds.core.GeneratorBasedBuilder` as
`array_record` with images/masks as PNG bytes, so no TensorFlow is needed to
write or read them.
"""
import dataclasses
import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from hica_jax.data import descriptors
from hica_jax.data import schema

FAMILIES = ("chestxray", "busi")
# From bench/synthetic_difficulty.py: at 0.25 a small CNN trained from scratch
# on K=16 per class reaches ~0.6 balanced accuracy (3 seen classes), far from
# saturation, while the ROI-crop oracle is ~0.95+.
DEFAULT_DIFFICULTY = 0.25
SPLITS = ("train", "val", "test")
# Images rendered at once: bounds memory (a few [chunk, H, W] f32 fields).
_CHUNK = 128


def bank_name(family):
  _check_family(family)
  return f"synthetic_{family}"


def _check_family(family):
  if family not in FAMILIES:
    raise ValueError(f"synthetic family {family!r} is unknown; use one of "
                     f"{FAMILIES}.")


def _check_params(image_size, difficulty):
  if not 0.0 <= difficulty <= 1.0:
    raise ValueError(f"synthetic difficulty={difficulty}: use a value in "
                     "[0, 1].")
  if image_size < 32:
    raise ValueError(f"synthetic image_size={image_size}: use at least 32 "
                     "(smaller lesions vanish).")


# ----------------------------------------------------------------------------
# Numeric helpers. Fields are f32[N, H, W]; coordinates are in [0, 1] of the
# image side; per-image scalars are [N] and broadcast as [N, 1, 1].


def _grid(size):
  """Pixel-centre coordinates (yy, xx), each f32[1, H, W] in [0, 1]."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  yy, xx = np.meshgrid(c, c, indexing="ij")
  return yy[None], xx[None]


def _col(a):
  """[N] -> f32[N, 1, 1]."""
  return np.asarray(a, np.float32).reshape(-1, 1, 1)


def _u(rng, lo, hi, n):
  return _col(rng.uniform(lo, hi, n))


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _soft_inside(sd, edge):
  """Soft indicator of sd < 0 (sd in pixels) with edge width `edge` pixels."""
  return _sigmoid(-sd / np.maximum(edge, 1e-3)).astype(np.float32)


def _blur(x, sigma_y, sigma_x=None, periodic=False):
  """Gaussian blur of f32[N, H, W]; sigma in pixels, scalar or [N].

  periodic: circular boundary, right for stationary noise (mirror padding
  would correlate the noise at the border and brighten it).
  """
  n, h, w = x.shape
  sigma_x = sigma_y if sigma_x is None else sigma_x
  sy = np.broadcast_to(np.asarray(sigma_y, np.float64).reshape(-1), (n,))
  sx = np.broadcast_to(np.asarray(sigma_x, np.float64).reshape(-1), (n,))
  pad = 0 if periodic else int(
      min(h - 1, w - 1, np.ceil(3 * max(sy.max(), sx.max(), 0.1))))
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
  fy = np.fft.fftfreq(xp.shape[1])[None, :, None]
  fx = np.fft.rfftfreq(xp.shape[2])[None, None, :]
  transfer = np.exp(-2 * np.pi**2 * (sy[:, None, None]**2 * fy**2 +
                                     sx[:, None, None]**2 * fx**2))
  out = np.fft.irfft2(np.fft.rfft2(xp) * transfer, s=xp.shape[1:])
  return out[:, pad:pad + h, pad:pad + w].astype(np.float32)


def _noise(rng, n, size, sigma_y, sigma_x=None):
  """Smooth Gaussian noise f32[N, H, W], unit std per image."""
  z = _blur(rng.standard_normal((n, size, size), dtype=np.float32),
            sigma_y, sigma_x, periodic=True)
  return z / (z.std(axis=(1, 2), keepdims=True) + 1e-6)


def _polar(yy, xx, cy, cx, aspect, angle):
  """Polar coordinates around (cy, cx) of an ellipse frame.

  aspect: width/height of the frame; angle: rotation in radians. Returns
  (rho, theta) f32[N, H, W]; rho is in image units of the geometric-mean
  radius, so a circle of radius r in the frame is rho < r.
  """
  dy, dx = yy - cy, xx - cx
  c, s = np.cos(angle), np.sin(angle)
  u = (c * dx + s * dy) / np.sqrt(aspect)
  v = (-s * dx + c * dy) * np.sqrt(aspect)
  return np.sqrt(u * u + v * v), np.arctan2(v, u)


def _harmonics(rng, theta, amp_lo, amp_hi, orders):
  """sum_k a_k cos(k theta + phi_k), a_k ~ U(amp_lo, amp_hi) per image."""
  n = theta.shape[0]
  out = np.zeros_like(theta)
  for k in orders:
    a = _u(rng, amp_lo, amp_hi, n)
    out += a * np.cos(k * theta + _u(rng, 0, 2 * np.pi, n))
  return out


def _spikes(rng, theta, count, amp_lo, amp_hi, sharpness):
  """Narrow radial spikes: sum_s b_s max(0, cos(theta - psi_s))^sharpness."""
  n = theta.shape[0]
  out = np.zeros_like(theta)
  for _ in range(count):
    c = np.maximum(np.cos(theta - _u(rng, 0, 2 * np.pi, n)), 0.0)
    out += _u(rng, amp_lo, amp_hi, n) * c**sharpness
  return out


def _ellipse_sd(yy, xx, cy, cx, ry, rx, size, power=2.0):
  """Approximate signed distance (pixels) to a (super-)ellipse."""
  q = np.abs((yy - cy) / ry)**power + np.abs((xx - cx) / rx)**power
  return (q**(1.0 / power) - 1.0) * np.minimum(rx, ry) * size


def _line_dist(yy, xx, y0, x0, angle, size):
  """(|distance| across, signed distance along) pixels to a line."""
  dy, dx = yy - y0, xx - x0
  c, s = np.cos(angle), np.sin(angle)
  return np.abs(-s * dx + c * dy) * size, (c * dx + s * dy) * size


def _lines(proj, period, width, size):
  """Thin periodic lines along `proj` (image units): f32 in [0, 1]."""
  t = (proj / period) % 1.0 - 0.5
  return np.exp(-((t * period * size) / width)**2)


# ----------------------------------------------------------------------------
# Chest X-ray-like family. Intensity is radiographic density (bright = dense).


def _chest_anatomy(rng, n, size, d):
  """Anatomy + class-independent distractors.

  Returns (density f32[N,H,W], lungs f32[2,N,H,W] soft lung fields (image
  left, image right), geometry dict of per-image [N,1,1] arrays).
  """
  yy, xx = _grid(size)
  s = _u(rng, 0.88, 1.06, n)
  cx, cy = _u(rng, 0.47, 0.53, n), _u(rng, 0.42, 0.49, n)
  body = _soft_inside(_ellipse_sd(yy, xx, cy + 0.12 * s, cx, 0.62 * s,
                                  0.45 * s, size, 2.6), 2.0)
  heart = _soft_inside(_ellipse_sd(yy, xx, cy + 0.14 * s, cx + 0.05 * s,
                                   0.12 * s * _u(rng, 0.9, 1.1, n),
                                   0.14 * s * _u(rng, 0.9, 1.1, n), size), 1.5)
  medi = _soft_inside((np.abs(xx - cx) - 0.045 * s) * size, 1.0)
  lungs, lcx, lrx, lry = [], [], [], []
  lcy = cy - 0.01 * s
  for side in (-1.0, 1.0):
    c_x = cx + side * 0.195 * s * _u(rng, 0.96, 1.04, n)
    rx = 0.155 * s * _u(rng, 0.92, 1.08, n)
    ry = 0.29 * s * _u(rng, 0.92, 1.06, n)
    v = np.clip((yy - lcy) / ry, -1, 1)
    taper = rx * (0.68 + 0.32 * v)  # apex narrower than base
    lung = _soft_inside(_ellipse_sd(yy, xx, lcy, c_x, ry, taper, size, 2.6),
                        1.0) * (1 - heart) * (1 - medi)
    lungs.append(lung)
    lcx.append(c_x)
    lrx.append(rx)
    lry.append(ry)
  lung_any = np.maximum(lungs[0], lungs[1])

  density = 0.04 + 0.56 * body + 0.06 * heart - 0.38 * lung_any
  # Spine with faint vertebral bodies.
  spine = _soft_inside((np.abs(xx - cx) - 0.03 * s) * size, 1.0) * body
  density += spine * (0.08 + 0.03 * np.cos(2 * np.pi * yy / (0.055 * s)))
  # Posterior ribs: thin arcs, seen mostly over the lungs.
  spacing = 0.07 * s * _u(rng, 0.94, 1.06, n)
  y0 = lcy - 0.27 * s + _u(rng, -0.01, 0.01, n)
  rib_amp = _u(rng, 0.04, 0.09, n)
  dx = np.abs(xx - cx)
  ribs = np.zeros_like(density)
  for k in range(8):
    yc = y0 + k * spacing - 0.15 * dx + 1.4 * dx**2 / s
    ribs = np.maximum(ribs, np.exp(-((yy - yc) / (0.011 * s))**2))
  over_lungs = _blur(lung_any, 0.04 * size)
  density += rib_amp * ribs * body * (0.2 + 0.8 * over_lungs)
  # Clavicles.
  for side in (-1.0, 1.0):
    a = np.arctan2(-0.05, side * 0.26)
    across, along = _line_dist(yy, xx, cy - 0.29 * s, cx + side * 0.04 * s,
                               a, size)
    seg = _soft_inside(np.abs(along - 0.13 * s * size) - 0.13 * s * size, 1.0)
    density += 0.11 * np.exp(-(across / (0.016 * s * size))**2) * seg
  # Vessels: meandering ridges fading from the hila.
  ridge = np.exp(-(_noise(rng, n, size, 1.6) / 0.35)**2)
  hila = np.minimum(np.hypot(yy - lcy, xx - lcx[0]),
                    np.hypot(yy - lcy, xx - lcx[1]))
  density += 0.07 * ridge * np.exp(-hila / 0.11) * lung_any
  # Distractors, same distribution for every class: calcified granulomas,
  # nipple shadows, an external lead wire.
  for _ in range(2):
    on = _col(rng.uniform(size=n) < 0.5)
    gy = lcy + _u(rng, -0.2, 0.25, n)
    gx = cx + _col(rng.choice([-1, 1], n)) * _u(rng, 0.1, 0.26, n)
    r = _u(rng, 0.008, 0.018, n) * size
    density += on * _u(rng, 0.15, 0.3, n) * _soft_inside(
        np.hypot(yy - gy, xx - gx) * size - r, 0.6)
  on = _col(rng.uniform(size=n) < 0.3)
  for side in (-1.0, 1.0):
    ny, nx = cy + 0.16 * s, cx + side * 0.2 * s
    density += on * 0.07 * _soft_inside(
        np.hypot(yy - ny, xx - nx) * size - 0.025 * s * size, 1.0)
  on = _col(rng.uniform(size=n) < 0.35)
  wire_y = _u(rng, 0.2, 0.8, n) + _u(rng, 0.03, 0.08, n) * np.sin(
      2 * np.pi * _u(rng, 0.5, 1.5, n) * xx + _u(rng, 0, 6.3, n))
  density += on * 0.22 * np.exp(-((yy - wire_y) * size / 0.5)**2)

  geom = dict(s=s, cx=cx, cy=cy, lcy=lcy, lcx=np.stack(lcx),
              lrx=np.stack(lrx), lry=np.stack(lry))
  return density.astype(np.float32), np.stack(lungs), geom


def _consolidation_shape(rng, g, size, d, edge):
  rho, th = _polar(g["yy"], g["xx"], g["ly"], g["lx"],
                   _u(rng, 0.75, 1.35, g["n"]), _u(rng, -np.pi, np.pi, g["n"]))
  r = g["r"] * (1 + _harmonics(rng, th, 0.0, 0.1, (2, 3)))
  sd = (rho - r) * size
  return sd, _soft_inside(sd, edge)


def _fill(rng, g, d):
  """Consolidation density: opaque, drifting towards ground glass with d."""
  return _u(rng, 1.0 - 0.45 * d, 1.0, g["n"])


def _chest_lobar(rng, g, size, d):
  _, env = _consolidation_shape(rng, g, size, d, 1.2)
  tex = 1 + 0.08 * _noise(rng, g["n"], size, 2.0)
  return env * _fill(rng, g, d) * tex, env


def _chest_air_bronchogram(rng, g, size, d):
  sd, env = _consolidation_shape(rng, g, size, d, 1.2)
  n = g["n"]
  direction = _u(rng, -np.pi, np.pi, n)
  oy = g["ly"] - 0.5 * g["r"] * np.sin(direction)
  ox = g["lx"] - 0.5 * g["r"] * np.cos(direction)
  tubes = np.zeros_like(env)
  for spread in (-0.45, 0.0, 0.45):
    across, along = _line_dist(g["yy"], g["xx"], oy, ox,
                               direction + spread + _u(rng, -0.15, 0.15, n),
                               size)
    tubes = np.maximum(tubes, np.exp(-(across / 0.6)**2) * (along > 0))
  core = _soft_inside(sd + 1.5, 0.8)
  return env * _fill(rng, g, d) * (1 - 0.75 * tubes * core), env


def _chest_fissure(rng, g, size, d):
  sd, blob = _consolidation_shape(rng, g, size, d, 1.8)
  n = g["n"]
  # Fissure: a near-horizontal plane cutting the blob with a sharp edge.
  a = _u(rng, -0.3, 0.3, n) + np.pi * _col(rng.integers(0, 2, n))
  off = _u(rng, -0.1, 0.35, n) * g["r"]
  plane = ((g["yy"] - g["ly"]) * np.cos(a) - (g["xx"] - g["lx"]) * np.sin(a)
           - off) * size
  env = blob * _soft_inside(plane, 0.35)
  return env * _fill(rng, g, d), env


def _viral_envelope(rng, g, size, edge=2.5):
  rho, th = _polar(g["yy"], g["xx"], g["ly"], g["lx"],
                   _u(rng, 0.7, 1.4, g["n"]), _u(rng, -np.pi, np.pi, g["n"]))
  r = g["r"] * (1 + _harmonics(rng, th, 0.08, 0.2, (2, 3, 4)))
  return _soft_inside((rho - r) * size, edge)


def _net(rng, g, size, orientations, period=0.05, width=0.55):
  """Warped line pattern(s) at random orientations, f32 in [0, 1]."""
  n = g["n"]
  warp = 0.25 * period * _noise(rng, n, size, 2.0)
  base = _u(rng, 0, np.pi, n)
  out = np.zeros((n, size, size), np.float32)
  for o in orientations:
    a = base + o + _u(rng, -0.2, 0.2, n)
    proj = g["yy"] * np.cos(a) - g["xx"] * np.sin(a) + warp
    out = np.maximum(out, _lines(proj, period * _u(rng, 0.9, 1.1, n), width,
                                 size))
  return out


def _viral_base(rng, g, d):
  """Background fill of interstitial patterns: rises towards consolidation."""
  return _u(rng, 0.08, 0.08 + 0.35 * d, g["n"])


def _chest_reticular(rng, g, size, d):
  env = _viral_envelope(rng, g, size)
  net = _net(rng, g, size, (0.0, np.pi / 2))
  return env * (_viral_base(rng, g, d) + 0.7 * net), env


def _chest_ground_glass(rng, g, size, d):
  env = _viral_envelope(rng, g, size, edge=3.0)
  tex = 1 + 0.3 * _noise(rng, g["n"], size, 0.8)
  return env * (_viral_base(rng, g, d) + 0.3) * tex, env


def _chest_reticulonodular(rng, g, size, d):
  env = _viral_envelope(rng, g, size)
  net = _net(rng, g, size, (0.0, np.pi / 2), period=0.06)
  dots = _sigmoid((_noise(rng, g["n"], size, 0.7) - 1.4) * 5)
  return env * (_viral_base(rng, g, d) + 0.45 * net + 0.6 * dots), env


def _chest_streaks(rng, g, size, d):
  env = _viral_envelope(rng, g, size)
  streaks = _net(rng, g, size, (0.0,), period=0.055, width=0.7)
  return env * (_viral_base(rng, g, d) + 0.75 * streaks), env


def _chest_effusion(rng, g, size, d, height, lateral_rise):
  """Basal opacity under a meniscus that rises towards the chest wall."""
  n = g["n"]
  side = g["side"]
  t = np.clip(side * (g["xx"] - g["lung_cx"]) / g["lung_rx"], -1, 1)
  base = g["lcy"] + 0.95 * g["lung_ry"]
  h = height(n) * g["s"]
  y_top = base - h * (1 + lateral_rise * t)
  env = _soft_inside((y_top - g["yy"]) * size, 0.8) * g["lung"]
  return env * _u(rng, 0.85, 1.0, n), env


_CHEST_LESIONS = {
    "dense homogeneous lobar consolidation": _chest_lobar,
    "consolidation with air bronchograms": _chest_air_bronchogram,
    "opacity sharply bordered by a fissure": _chest_fissure,
    "fine reticular interstitial opacities": _chest_reticular,
    "hazy ground-glass opacity": _chest_ground_glass,
    "reticulonodular interstitial pattern": _chest_reticulonodular,
    "peribronchial linear streaky opacities": _chest_streaks,
    "blunting of the costophrenic angle":
        lambda rng, g, size, d: _chest_effusion(
            rng, g, size, d, lambda n: _u(rng, 0.07, 0.11, n), 1.4),
    "meniscus-shaped homogeneous basal opacity":
        lambda rng, g, size, d: _chest_effusion(
            rng, g, size, d, lambda n: _u(rng, 0.12, 0.2, n), 0.6),
}


def _render_chestxray(rng, variant, size, d, lesions=True):
  """variant: i32[N] index into the lesion list (-1: no lesion).

  Returns (image f32[N,H,W] in [0,1], mask bool[N,H,W]).
  """
  n = variant.shape[0]
  density, lungs, geom = _chest_anatomy(rng, n, size, d)
  mask = np.zeros((n, size, size), bool)
  yy, xx = _grid(size)
  # Lesion geometry drawn for every image (keeps the random stream aligned).
  side_idx = rng.integers(0, 2, n)
  pick = lambda a: np.where(side_idx[:, None, None] == 0, a[0], a[1])
  lung, lung_cx = pick(lungs), pick(geom["lcx"])
  lung_rx, lung_ry = pick(geom["lrx"]), pick(geom["lry"])
  v = _u(rng, -0.45, 0.5, n)
  ly = geom["lcy"] + v * lung_ry
  lx = lung_cx + _u(rng, -0.4, 0.4, n) * lung_rx * (0.7 + 0.3 * v)
  r = _u(rng, 0.06, 0.12, n) * geom["s"]
  contrast = _u(rng, 0.75, 1.25, n) * 0.4 * (1 - 0.5 * d)
  names = list(_CHEST_LESIONS)
  for k in np.unique(variant[variant >= 0]):
    idx = np.flatnonzero(variant == k)
    g = dict(n=len(idx), yy=yy, xx=xx, ly=ly[idx], lx=lx[idx], r=r[idx],
             s=geom["s"][idx], lcy=geom["lcy"][idx], lung=lung[idx],
             lung_cx=lung_cx[idx], lung_rx=lung_rx[idx],
             lung_ry=lung_ry[idx], side=_col(2.0 * side_idx[idx] - 1))
    opacity, env = _CHEST_LESIONS[names[k]](rng, g, size, d)
    density[idx] += lesions * contrast[idx] * opacity * lung[idx]
    mask[idx] = (env > 0.35) & (lung[idx] > 0.5)
  # Acquisition nuisance: exposure window, gamma, blur, noise.
  lo = _u(rng, -0.06, 0.06, n)
  hi = _u(rng, 0.72, 0.95, n)
  img = np.clip((density - lo) / (hi - lo), 0, 1)**_u(rng, 0.8, 1.25, n)
  img = _blur(img, rng.uniform(0.3, 0.9, n))
  img += _u(rng, 0.01, 0.02 + 0.05 * d, n) * rng.standard_normal(
      img.shape, dtype=np.float32)
  return np.clip(img, 0, 1), mask


# ----------------------------------------------------------------------------
# Breast-ultrasound-like family. Intensity is echogenicity.


def _wave(rng, xx, amp, n):
  out = 0
  for _ in range(2):
    out = out + _u(rng, 0, amp, n) * np.sin(
        2 * np.pi * _u(rng, 0.5, 2.0, n) * xx + _u(rng, 0, 6.3, n))
  return out


def _busi_anatomy(rng, n, size, d):
  """Layered tissue echogenicity + class-independent distractors.

  Returns (echo f32[N,H,W], geometry dict).
  """
  yy, xx = _grid(size)
  y_skin = _u(rng, 0.015, 0.04, n)
  y_fat = y_skin + _u(rng, 0.1, 0.2, n) + _wave(rng, xx, 0.02, n)
  y_gland = y_fat + _u(rng, 0.38, 0.5, n) + _wave(rng, xx, 0.04, n)
  y_retro = y_gland + _u(rng, 0.02, 0.05, n)
  y_muscle = y_retro + _u(rng, 0.1, 0.16, n)
  below = lambda y: _sigmoid((yy - y) * size / 0.8)
  e_fat = _u(rng, 0.28, 0.38, n)
  e_gland = _u(rng, 0.55, 0.72, n)
  gland_tex = e_gland * (1 + 0.25 * _noise(rng, n, size, 1.0, 2.5))
  tilt = _u(rng, -0.15, 0.15, n)
  muscle = 0.42 + 0.12 * np.cos(2 * np.pi * (yy + tilt * xx) / 0.03)
  echo = 0.04 * (1 - below(y_skin)) + e_fat * (below(y_skin) - below(y_fat))
  echo += gland_tex * (below(y_fat) - below(y_gland))
  echo += e_fat * (below(y_gland) - below(y_retro))
  echo += muscle * (below(y_retro) - below(y_muscle))
  echo += 0.15 * below(y_muscle)
  # Skin: a bright double line.
  echo += 0.8 * np.exp(-((yy - y_skin) * size / 0.6)**2)
  echo += 0.45 * np.exp(-((yy - y_skin - 0.02) * size / 0.6)**2)
  # Fat lobules (hypoechoic ovals, the classic mass mimic) in fat or gland.
  for _ in range(3):
    on = _col(rng.uniform(size=n) < 0.6)
    ly = y_skin + _u(rng, 0.05, 0.45, n)
    lx = _u(rng, 0.1, 0.9, n)
    rho, _ = _polar(yy, xx, ly, lx, _u(rng, 1.5, 2.6, n), _u(rng, -0.3, 0.3, n))
    lob = on * _soft_inside((rho - _u(rng, 0.03, 0.07, n)) * size, 1.2)
    echo = echo * (1 - lob) + lob * e_fat * _u(rng, 0.8, 1.0, n)
  # Cooper ligaments: thin bright curves in the fat/gland.
  for _ in range(3):
    yc = y_fat + _u(rng, -0.06, 0.12, n) + _wave(rng, xx, 0.04, n)
    echo += _u(rng, 0.15, 0.4, n) * np.exp(-((yy - yc) * size / 0.6)**2) * (
        1 - below(y_gland))
  geom = dict(y_fat=y_fat, y_gland=y_gland, e_gland=e_gland, e_fat=e_fat)
  return echo.astype(np.float32), geom


def _mass(rng, g, size, aspect, harm, spikes=None, edge=0.7):
  """Star-shaped mass: returns signed distance (pixels) and soft interior."""
  n = g["n"]
  rho, th = _polar(g["yy"], g["xx"], g["ly"], g["lx"], aspect(n),
                   _u(rng, -0.25, 0.25, n))
  r = 1 + _harmonics(rng, th, *harm)
  if spikes:
    r = r + _spikes(rng, th, *spikes)
  sd = (rho - g["r"] * r) * size
  return sd, _soft_inside(sd, edge)


def _column(g, size, half_width):
  """Posterior acoustic column below the mass centre, f32 in [0, 1]."""
  across = np.abs(g["xx"] - g["lx"]) - half_width
  return _soft_inside(across * size, 1.5) * _sigmoid(
      (g["yy"] - g["ly"]) * size / 2.0)


def _heterogeneous(rng, g, size, echo_in):
  n = g["n"]
  calc = _sigmoid((_noise(rng, n, size, 0.6) - 2.0) * 5)
  return np.maximum(echo_in * (1 + 0.5 * _noise(rng, n, size, 1.0)), 0), calc


def _lesion(inside, echo_in, speckle=1.0, add=0.0, post=1.0, mask=None):
  return dict(inside=inside, echo=echo_in, speckle=speckle, add=add,
              post=post, mask=inside > 0.5 if mask is None else mask)


def _busi_oval(rng, g, size, d):
  _, inside = _mass(rng, g, size, lambda n: _u(rng, 1.35, 2.1, n),
                    (0.0, 0.03 + 0.08 * d, (2, 3, 4)))
  return _lesion(inside, g["echo_in"], speckle=0.8)


def _busi_lobulated(rng, g, size, d):
  _, inside = _mass(rng, g, size, lambda n: _u(rng, 1.2, 1.8, n),
                    (0.1, 0.18, (2, 3)))
  return _lesion(inside, g["echo_in"], speckle=0.8)


def _busi_capsule(rng, g, size, d):
  sd, inside = _mass(rng, g, size, lambda n: _u(rng, 1.3, 2.0, n),
                     (0.0, 0.03 + 0.08 * d, (2, 3)))
  rim = 0.35 * np.exp(-(sd / 0.7)**2)
  return _lesion(inside, g["echo_in"], speckle=0.8, add=rim)


def _busi_spiculated(rng, g, size, d):
  spike = 0.6 * (1 - 0.5 * d)
  _, inside = _mass(rng, g, size, lambda n: _u(rng, 0.9, 1.4, n),
                    (0.04, 0.12, (2, 3, 5)),
                    spikes=(10, 0.5 * spike, spike, 30), edge=0.5)
  echo_in, calc = _heterogeneous(rng, g, size, g["echo_in"])
  return _lesion(inside, echo_in, add=0.5 * calc * inside)


def _busi_angular(rng, g, size, d):
  n = g["n"]
  rho, th = _polar(g["yy"], g["xx"], g["ly"], g["lx"], _u(rng, 0.9, 1.5, n),
                   _u(rng, -0.25, 0.25, n))
  # Polygon radius (angular corners) + microlobulation.
  sides = _col(rng.integers(4, 7, n))
  sector = 2 * np.pi / sides
  phase = (th + _u(rng, 0, np.pi, n)) % sector - sector / 2
  r = 1.15 * np.cos(np.pi / sides) / np.cos(phase)  # ~ the area of a disc
  r = r + _harmonics(rng, th, 0.03, 0.06 * (1 - 0.5 * d) + 0.02, (9, 12))
  inside = _soft_inside((rho - g["r"] * r) * size, 0.5)
  echo_in, calc = _heterogeneous(rng, g, size, g["echo_in"])
  return _lesion(inside, echo_in, add=0.4 * calc * inside)


def _busi_shadowing(rng, g, size, d):
  _, inside = _mass(rng, g, size, lambda n: _u(rng, 0.9, 1.5, n),
                    (0.06, 0.16, (2, 3, 4, 6)), edge=0.6)
  echo_in, _ = _heterogeneous(rng, g, size, g["echo_in"])
  shadow = _u(rng, 0.35, 0.65, g["n"]) * (1 - 0.4 * d)
  post = 1 - shadow * _column(g, size, 0.8 * g["r"]) * (1 - inside)
  return _lesion(inside, echo_in, post=post)


def _busi_taller(rng, g, size, d):
  sd, inside = _mass(rng, g, size, lambda n: _u(rng, 0.5, 0.8, n),
                     (0.05, 0.14, (2, 3, 5)), edge=0.6)
  halo = _soft_inside(sd - 2.5, 0.7) * _sigmoid(sd / 0.7)
  echo_in, _ = _heterogeneous(rng, g, size, g["echo_in"])
  return _lesion(inside, echo_in, add=0.3 * halo)


def _busi_cyst(rng, g, size, d, aspect, wall, enhance):
  sd, inside = _mass(rng, g, size, aspect, (0.0, 0.02, (2,)), edge=0.5)
  post = 1 + enhance(g["n"]) * _column(g, size, 0.8 * g["r"]) * (1 - inside)
  return _lesion(inside, 0.02, speckle=0.05,
                 add=wall * np.exp(-(sd / 0.6)**2), post=post)


_BUSI_LESIONS = {
    "oval circumscribed mass with smooth margin": _busi_oval,
    "gently lobulated mass with smooth lobulations": _busi_lobulated,
    "homogeneous hypoechoic mass with thin echogenic capsule": _busi_capsule,
    "irregular mass with spiculated margin": _busi_spiculated,
    "angular microlobulated margin with heterogeneous echoes": _busi_angular,
    "irregular heterogeneous mass with posterior acoustic shadowing":
        _busi_shadowing,
    "taller-than-wide mass with echogenic halo": _busi_taller,
    "anechoic round cyst with posterior acoustic enhancement":
        lambda rng, g, size, d: _busi_cyst(
            rng, g, size, d, lambda n: _u(rng, 1.0, 1.25, n), 0.25,
            lambda n: _u(rng, 0.4, 0.7, n)),
    "oval anechoic cyst with thin echogenic wall":
        lambda rng, g, size, d: _busi_cyst(
            rng, g, size, d, lambda n: _u(rng, 1.4, 2.0, n), 0.45,
            lambda n: _u(rng, 0.2, 0.4, n)),
}


def _render_busi(rng, variant, size, d, lesions=True):
  """variant: i32[N] index into the lesion list (-1: no lesion).

  Returns (image f32[N,H,W] in [0,1], mask bool[N,H,W]).
  """
  n = variant.shape[0]
  yy, xx = _grid(size)
  echo, geom = _busi_anatomy(rng, n, size, d)
  # Lesion geometry for every image (keeps the random stream aligned).
  lx = _u(rng, 0.25, 0.75, n)
  top = np.take_along_axis(geom["y_fat"][:, 0], np.clip(
      (lx[:, 0] * size).astype(int), 0, size - 1), axis=1)[:, :, None]
  ly = np.clip(top + _u(rng, 0.1, 0.3, n), 0.2, 0.65)
  r = _u(rng, 0.08, 0.16, n)
  # Lesion echogenicity relative to the gland: closer to fat with d.
  echo_in = geom["e_gland"] * (1 - _u(rng, 0.65, 0.9, n) * (1 - 0.4 * d))
  speck = np.ones_like(echo)
  add = np.zeros_like(echo)
  post = np.ones_like(echo)
  mask = np.zeros((n, size, size), bool)
  names = list(_BUSI_LESIONS)
  for k in np.unique(variant[variant >= 0]):
    idx = np.flatnonzero(variant == k)
    g = dict(n=len(idx), yy=yy, xx=xx, ly=ly[idx], lx=lx[idx], r=r[idx],
             echo_in=echo_in[idx])
    les = _BUSI_LESIONS[names[k]](rng, g, size, d)
    mask[idx] = les["mask"]
    if not lesions:
      continue
    echo[idx] = echo[idx] * (1 - les["inside"]) + les["inside"] * les["echo"]
    speck[idx] = 1 - les["inside"] * (1 - les["speckle"])
    add[idx] = les["add"]
    post[idx] = les["post"]
  # Fully developed speckle: |complex Gaussian|, laterally elongated, mean 1.
  grain = _u(rng, 0.8, 1.3, n)[:, 0, 0]
  re = _blur(rng.standard_normal(echo.shape, dtype=np.float32),
             0.6 * grain, 1.1 * grain, periodic=True)
  im = _blur(rng.standard_normal(echo.shape, dtype=np.float32),
             0.6 * grain, 1.1 * grain, periodic=True)
  speckle = np.hypot(re, im)
  speckle /= speckle.mean(axis=(1, 2), keepdims=True)
  img = echo * (1 + (0.5 + 0.3 * d) * (speckle - 1) * speck) + add
  img = img * post
  # Acquisition nuisance: gain, depth attenuation, gamma, blur, noise.
  img *= _u(rng, 0.75, 1.2, n) * np.exp(-_u(rng, 0.2, 1.2, n) * yy)
  img = np.clip(img, 0, None)**_u(rng, 0.75, 1.15, n)
  img = _blur(img, rng.uniform(0.3, 0.7, n))
  img += _u(rng, 0.01, 0.02 + 0.05 * d, n) * rng.standard_normal(
      img.shape, dtype=np.float32)
  return np.clip(img, 0, 1), mask


_RENDER = {"chestxray": (_render_chestxray, _CHEST_LESIONS),
           "busi": (_render_busi, _BUSI_LESIONS)}


# ----------------------------------------------------------------------------
# Category structure from the descriptor bank.


def category_variants(family):
  """(categories, unseen, {category: [phrase, ...]}) from the family's bank.

  Raises ValueError when a bank phrase has no renderer here.
  """
  bank = descriptors.load_bank(bank_name(family))
  lesions = _RENDER[family][1]
  cats = list(bank["categories"])
  phrases = {c: list(bank["categories"][c].get("phrases", [])) for c in cats}
  for c, ps in phrases.items():
    for p in ps:
      if p not in lesions:
        raise ValueError(
            f"bank {bank_name(family)}.json: phrase {p!r} of category {c!r} "
            "has no renderer in hica_jax/data/synthetic.py; use one of "
            f"{sorted(lesions)} or add a renderer.")
  return cats, list(bank.get("unseen", [])), phrases


def generate(family, labels, *, image_size, seed, difficulty=DEFAULT_DIFFICULTY,
             stream=0, lesions=True):
  """Renders one image per label.

  Args:
    family: "chestxray" or "busi".
    labels: i32[N] category indices (bank order).
    image_size: side S in pixels.
    seed, stream: the random stream is SeedSequence([seed, family, stream]).
    difficulty: float in [0, 1].
    lesions: False renders the lesion-free twins of the same images (same
      anatomy, nuisance and noise; mask/phrase still say where and what the
      lesion would be): a counterfactual for locality checks.
  Returns dict: image u8[N,S,S] grayscale, mask u8[N,S,S] in {0, 255},
    phrase list[str] ("" without ROI), has_roi i32[N].
  """
  _check_family(family)
  _check_params(image_size, difficulty)
  render, renderers = _RENDER[family]
  cats, _, phrases = category_variants(family)
  labels = np.asarray(labels, np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= len(cats)):
    raise ValueError(f"labels must lie in [0, {len(cats)}) for {family}.")
  rng = np.random.default_rng(
      np.random.SeedSequence([seed, FAMILIES.index(family), stream]))
  names = list(renderers)
  variant = np.full(labels.shape, -1, np.int64)
  phrase = [""] * len(labels)
  for i, y in enumerate(labels):
    ps = phrases[cats[y]]
    if ps:
      p = ps[rng.integers(len(ps))]
      variant[i], phrase[i] = names.index(p), p
  images, masks = [], []
  for start in range(0, len(labels), _CHUNK):
    img, m = render(rng, variant[start:start + _CHUNK], image_size,
                    float(difficulty), lesions)
    images.append(np.round(img * 255).astype(np.uint8))
    masks.append(m.astype(np.uint8) * 255)
  shape = (0, image_size, image_size)
  image = np.concatenate(images) if images else np.zeros(shape, np.uint8)
  mask = np.concatenate(masks) if masks else np.zeros(shape, np.uint8)
  has_roi = (mask.reshape(len(labels), -1).max(-1) > 0).astype(np.int32)
  lost = np.flatnonzero(has_roi != (variant >= 0))
  if len(lost):
    raise RuntimeError(f"synthetic {family}: {len(lost)} lesion(s) rendered "
                       f"with an empty mask at image_size={image_size} "
                       "(a generator bug); try a larger image_size.")
  return dict(image=image, mask=mask, phrase=phrase, has_roi=has_roi)


# ----------------------------------------------------------------------------
# tfds builders.


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Generation parameters; the config name encodes all of them."""
  image_size: int = 64
  num_per_class: tuple = (150, 30, 60)  # train, val, test
  seed: int = 0
  difficulty: float = DEFAULT_DIFFICULTY


def make_config(*, image_size, num_per_class, seed, difficulty):
  """A config whose name (the data folder) is unique per parameter set."""
  _check_params(image_size, difficulty)
  difficulty = round(float(difficulty), 3)
  tr, va, te = (int(x) for x in num_per_class)
  name = (f"s{int(image_size)}_n{tr}-{va}-{te}_seed{int(seed)}"
          f"_d{int(round(difficulty * 1000)):04d}")
  return SyntheticConfig(name=name, image_size=int(image_size),
                         num_per_class=(tr, va, te), seed=int(seed),
                         difficulty=difficulty)


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
  """Shared builder; subclasses set FAMILY."""
  FAMILY = None
  # Bump when the generator's output changes, so old folders are not reused.
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [make_config(image_size=64, num_per_class=(150, 30, 60),
                                 seed=0, difficulty=DEFAULT_DIFFICULTY)]

  def _info(self):
    cats, unseen, _ = category_variants(self.FAMILY)
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"Procedural {self.FAMILY} data of hica-jax "
                     "(hica_jax/data/synthetic.py)."),
        features=schema.features(cats),
        metadata=tfds.core.MetadataDict(
            family=self.FAMILY, unseen=unseen, image_size=cfg.image_size,
            seed=cfg.seed, difficulty=cfg.difficulty))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in
            zip(SPLITS, self.builder_config.num_per_class)}

  def _generate_examples(self, split, num_per_class):
    cfg = self.builder_config
    cats, _, _ = category_variants(self.FAMILY)
    labels = np.repeat(np.arange(len(cats)), num_per_class)
    data = generate(self.FAMILY, labels, image_size=cfg.image_size,
                    seed=cfg.seed, difficulty=cfg.difficulty,
                    stream=SPLITS.index(split))
    for i, y in enumerate(labels):
      key = f"{self.FAMILY}-{split}-{i:06d}"
      yield key, {
          "image": _png(np.repeat(data["image"][i][..., None], 3, axis=-1)),
          "mask": _png(data["mask"][i]),
          "label": int(y),
          "text": "",
          "phrase": data["phrase"][i],
          "has_roi": int(data["has_roi"][i]),
          "id": key,
          "patient_id": "",
      }


class SyntheticChestxray(_SyntheticBuilder):
  """Chest-X-ray-like procedural data (tfds name `synthetic_chestxray`)."""
  FAMILY = "chestxray"


class SyntheticBusi(_SyntheticBuilder):
  """Breast-ultrasound-like procedural data (tfds name `synthetic_busi`)."""
  FAMILY = "busi"


BUILDERS = {"chestxray": SyntheticChestxray, "busi": SyntheticBusi}


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def build_synthetic(family, data_dir, *, image_size=64, num_train_per_class=150,
                    num_val_per_class=30, num_test_per_class=60, seed=0,
                    difficulty=DEFAULT_DIFFICULTY):
  """Builds the family's array_record data once and returns its builder.

  The data lives in data_dir/synthetic_<family>/<config name>/<version>; the
  config name encodes every parameter, so different parameters never share a
  folder, and an existing folder is reused. Read it with
  `builder.as_data_source(split)` (no TensorFlow needed).
  """
  _check_family(family)
  config = make_config(
      image_size=image_size, seed=seed, difficulty=difficulty,
      num_per_class=(num_train_per_class, num_val_per_class,
                     num_test_per_class))
  if min(config.num_per_class) < 1:
    raise ValueError("synthetic num_{train,val,test}_per_class must be >= 1, "
                     f"got {config.num_per_class}.")
  # tfds refuses a custom config named like a registered one: pass the name.
  registered = {c.name for c in BUILDERS[family].BUILDER_CONFIGS}
  builder = BUILDERS[family](
      data_dir=data_dir,
      config=config.name if config.name in registered else config,
      file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


# ----------------------------------------------------------------------------
# Contact sheet.


def contact_sheet(family, path=None, *, n_per_class=4, image_size=96, seed=0,
                  difficulty=DEFAULT_DIFFICULTY):
  """PNG grid: one row per category, each example plain and with its mask.

  Returns the path written (default /tmp/synthetic_<family>.png).
  """
  path = path or f"/tmp/synthetic_{family}.png"
  cats, unseen, _ = category_variants(family)
  labels = np.repeat(np.arange(len(cats)), n_per_class)
  data = generate(family, labels, image_size=image_size, seed=seed,
                  difficulty=difficulty, stream=99)
  s, label_w, text_h, gap = image_size, 120, 30, 6
  tile_w = 2 * s + gap
  sheet = Image.new("RGB", (label_w + n_per_class * tile_w,
                            len(cats) * (s + text_h + gap)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for i, y in enumerate(labels):
    row, col = y, i % n_per_class
    x0, y0 = label_w + col * tile_w, row * (s + text_h + gap)
    gray = np.repeat(data["image"][i][..., None], 3, axis=-1)
    m = data["mask"][i] > 0
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    overlay = gray.copy()
    overlay[m] = (0.6 * overlay[m] + 0.4 * np.array([255, 0, 0])).astype(
        np.uint8)
    overlay[m & ~inner] = (255, 40, 40)
    sheet.paste(Image.fromarray(gray), (x0, y0))
    sheet.paste(Image.fromarray(overlay), (x0 + s, y0))
    caption = "\n".join(textwrap.wrap(data["phrase"][i] or "(no ROI)",
                                      width=max(10, tile_w // 6))[:2])
    draw.text((x0, y0 + s + 1), caption, fill=(0, 0, 0))
    if col == 0:
      name = cats[y].replace("_", " ") + (
          " (unseen)" if cats[y] in unseen else "")
      draw.text((4, y0 + s // 2), "\n".join(textwrap.wrap(name, 18)),
                fill=(0, 0, 0))
  sheet.save(path)
  return path
