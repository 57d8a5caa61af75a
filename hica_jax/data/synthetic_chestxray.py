"""The chest-X-ray-like synthetic family: anatomy, lesions, rendering.

Intensity is radiographic density (bright = dense). `render` draws body,
lungs, heart, spine, ribs, clavicles, vessels and class-independent
distractors (granulomas, nipple shadows, a lead wire), then one lesion
variant per image inside a lung (`LESIONS`: lobar consolidation,
interstitial opacities, pleural effusion; keys are the bank's local phrases
of `banks/synthetic_chestxray.json`), then the acquisition nuisance.
"""
import numpy as np

from hica_jax.data.synthetic_fields import (blur, col, ellipse_sd, grid,
                                            harmonics, line_dist, lines, noise,
                                            polar, sigmoid, soft_inside, u)


def _chest_anatomy(rng, n, size, d):
  """Anatomy + class-independent distractors.

  Returns (density f32[N,H,W], lungs f32[2,N,H,W] soft lung fields (image
  left, image right), geometry dict of per-image [N,1,1] arrays).
  """
  yy, xx = grid(size)
  s = u(rng, 0.88, 1.06, n)
  cx, cy = u(rng, 0.47, 0.53, n), u(rng, 0.42, 0.49, n)
  body = soft_inside(ellipse_sd(yy, xx, cy + 0.12 * s, cx, 0.62 * s,
                                  0.45 * s, size, 2.6), 2.0)
  heart = soft_inside(ellipse_sd(yy, xx, cy + 0.14 * s, cx + 0.05 * s,
                                   0.12 * s * u(rng, 0.9, 1.1, n),
                                   0.14 * s * u(rng, 0.9, 1.1, n), size), 1.5)
  medi = soft_inside((np.abs(xx - cx) - 0.045 * s) * size, 1.0)
  lungs, lcx, lrx, lry = [], [], [], []
  lcy = cy - 0.01 * s
  for side in (-1.0, 1.0):
    c_x = cx + side * 0.195 * s * u(rng, 0.96, 1.04, n)
    rx = 0.155 * s * u(rng, 0.92, 1.08, n)
    ry = 0.29 * s * u(rng, 0.92, 1.06, n)
    v = np.clip((yy - lcy) / ry, -1, 1)
    taper = rx * (0.68 + 0.32 * v)  # apex narrower than base
    lung = soft_inside(ellipse_sd(yy, xx, lcy, c_x, ry, taper, size, 2.6),
                        1.0) * (1 - heart) * (1 - medi)
    lungs.append(lung)
    lcx.append(c_x)
    lrx.append(rx)
    lry.append(ry)
  lung_any = np.maximum(lungs[0], lungs[1])

  density = 0.04 + 0.56 * body + 0.06 * heart - 0.38 * lung_any
  # Spine with faint vertebral bodies.
  spine = soft_inside((np.abs(xx - cx) - 0.03 * s) * size, 1.0) * body
  density += spine * (0.08 + 0.03 * np.cos(2 * np.pi * yy / (0.055 * s)))
  # Posterior ribs: thin arcs, seen mostly over the lungs.
  spacing = 0.07 * s * u(rng, 0.94, 1.06, n)
  y0 = lcy - 0.27 * s + u(rng, -0.01, 0.01, n)
  rib_amp = u(rng, 0.04, 0.09, n)
  dx = np.abs(xx - cx)
  ribs = np.zeros_like(density)
  for k in range(8):
    yc = y0 + k * spacing - 0.15 * dx + 1.4 * dx**2 / s
    ribs = np.maximum(ribs, np.exp(-((yy - yc) / (0.011 * s))**2))
  over_lungs = blur(lung_any, 0.04 * size)
  density += rib_amp * ribs * body * (0.2 + 0.8 * over_lungs)
  # Clavicles.
  for side in (-1.0, 1.0):
    a = np.arctan2(-0.05, side * 0.26)
    across, along = line_dist(yy, xx, cy - 0.29 * s, cx + side * 0.04 * s,
                               a, size)
    seg = soft_inside(np.abs(along - 0.13 * s * size) - 0.13 * s * size, 1.0)
    density += 0.11 * np.exp(-(across / (0.016 * s * size))**2) * seg
  # Vessels: meandering ridges fading from the hila.
  ridge = np.exp(-(noise(rng, n, size, 1.6) / 0.35)**2)
  hila = np.minimum(np.hypot(yy - lcy, xx - lcx[0]),
                    np.hypot(yy - lcy, xx - lcx[1]))
  density += 0.07 * ridge * np.exp(-hila / 0.11) * lung_any
  # Distractors, same distribution for every class: calcified granulomas,
  # nipple shadows, an external lead wire.
  for _ in range(2):
    on = col(rng.uniform(size=n) < 0.5)
    gy = lcy + u(rng, -0.2, 0.25, n)
    gx = cx + col(rng.choice([-1, 1], n)) * u(rng, 0.1, 0.26, n)
    r = u(rng, 0.008, 0.018, n) * size
    density += on * u(rng, 0.15, 0.3, n) * soft_inside(
        np.hypot(yy - gy, xx - gx) * size - r, 0.6)
  on = col(rng.uniform(size=n) < 0.3)
  for side in (-1.0, 1.0):
    ny, nx = cy + 0.16 * s, cx + side * 0.2 * s
    density += on * 0.07 * soft_inside(
        np.hypot(yy - ny, xx - nx) * size - 0.025 * s * size, 1.0)
  on = col(rng.uniform(size=n) < 0.35)
  wire_y = u(rng, 0.2, 0.8, n) + u(rng, 0.03, 0.08, n) * np.sin(
      2 * np.pi * u(rng, 0.5, 1.5, n) * xx + u(rng, 0, 6.3, n))
  density += on * 0.22 * np.exp(-((yy - wire_y) * size / 0.5)**2)

  geom = dict(s=s, cx=cx, cy=cy, lcy=lcy, lcx=np.stack(lcx),
              lrx=np.stack(lrx), lry=np.stack(lry))
  return density.astype(np.float32), np.stack(lungs), geom


def _consolidation_shape(rng, g, size, d, edge):
  rho, th = polar(g["yy"], g["xx"], g["ly"], g["lx"],
                   u(rng, 0.75, 1.35, g["n"]), u(rng, -np.pi, np.pi, g["n"]))
  r = g["r"] * (1 + harmonics(rng, th, 0.0, 0.1, (2, 3)))
  sd = (rho - r) * size
  return sd, soft_inside(sd, edge)


def _fill(rng, g, d):
  """Consolidation density: opaque, drifting towards ground glass with d."""
  return u(rng, 1.0 - 0.45 * d, 1.0, g["n"])


def _chest_lobar(rng, g, size, d):
  _, env = _consolidation_shape(rng, g, size, d, 1.2)
  tex = 1 + 0.08 * noise(rng, g["n"], size, 2.0)
  return env * _fill(rng, g, d) * tex, env


def _chest_air_bronchogram(rng, g, size, d):
  sd, env = _consolidation_shape(rng, g, size, d, 1.2)
  n = g["n"]
  direction = u(rng, -np.pi, np.pi, n)
  oy = g["ly"] - 0.5 * g["r"] * np.sin(direction)
  ox = g["lx"] - 0.5 * g["r"] * np.cos(direction)
  tubes = np.zeros_like(env)
  for spread in (-0.45, 0.0, 0.45):
    across, along = line_dist(g["yy"], g["xx"], oy, ox,
                               direction + spread + u(rng, -0.15, 0.15, n),
                               size)
    tubes = np.maximum(tubes, np.exp(-(across / 0.6)**2) * (along > 0))
  core = soft_inside(sd + 1.5, 0.8)
  return env * _fill(rng, g, d) * (1 - 0.75 * tubes * core), env


def _chest_fissure(rng, g, size, d):
  sd, blob = _consolidation_shape(rng, g, size, d, 1.8)
  n = g["n"]
  # Fissure: a near-horizontal plane cutting the blob with a sharp edge.
  a = u(rng, -0.3, 0.3, n) + np.pi * col(rng.integers(0, 2, n))
  off = u(rng, -0.1, 0.35, n) * g["r"]
  plane = ((g["yy"] - g["ly"]) * np.cos(a) - (g["xx"] - g["lx"]) * np.sin(a)
           - off) * size
  env = blob * soft_inside(plane, 0.35)
  return env * _fill(rng, g, d), env


def _viral_envelope(rng, g, size, edge=2.5):
  rho, th = polar(g["yy"], g["xx"], g["ly"], g["lx"],
                   u(rng, 0.7, 1.4, g["n"]), u(rng, -np.pi, np.pi, g["n"]))
  r = g["r"] * (1 + harmonics(rng, th, 0.08, 0.2, (2, 3, 4)))
  return soft_inside((rho - r) * size, edge)


def _net(rng, g, size, orientations, period=0.05, width=0.55):
  """Warped line pattern(s) at random orientations, f32 in [0, 1]."""
  n = g["n"]
  warp = 0.25 * period * noise(rng, n, size, 2.0)
  base = u(rng, 0, np.pi, n)
  out = np.zeros((n, size, size), np.float32)
  for o in orientations:
    a = base + o + u(rng, -0.2, 0.2, n)
    proj = g["yy"] * np.cos(a) - g["xx"] * np.sin(a) + warp
    out = np.maximum(out, lines(proj, period * u(rng, 0.9, 1.1, n), width,
                                 size))
  return out


def _viral_base(rng, g, d):
  """Background fill of interstitial patterns: rises towards consolidation."""
  return u(rng, 0.08, 0.08 + 0.35 * d, g["n"])


def _chest_reticular(rng, g, size, d):
  env = _viral_envelope(rng, g, size)
  net = _net(rng, g, size, (0.0, np.pi / 2))
  return env * (_viral_base(rng, g, d) + 0.7 * net), env


def _chest_ground_glass(rng, g, size, d):
  env = _viral_envelope(rng, g, size, edge=3.0)
  tex = 1 + 0.3 * noise(rng, g["n"], size, 0.8)
  return env * (_viral_base(rng, g, d) + 0.3) * tex, env


def _chest_reticulonodular(rng, g, size, d):
  env = _viral_envelope(rng, g, size)
  net = _net(rng, g, size, (0.0, np.pi / 2), period=0.06)
  dots = sigmoid((noise(rng, g["n"], size, 0.7) - 1.4) * 5)
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
  env = soft_inside((y_top - g["yy"]) * size, 0.8) * g["lung"]
  return env * u(rng, 0.85, 1.0, n), env


LESIONS = {
    "dense homogeneous lobar consolidation": _chest_lobar,
    "consolidation with air bronchograms": _chest_air_bronchogram,
    "opacity sharply bordered by a fissure": _chest_fissure,
    "fine reticular interstitial opacities": _chest_reticular,
    "hazy ground-glass opacity": _chest_ground_glass,
    "reticulonodular interstitial pattern": _chest_reticulonodular,
    "peribronchial linear streaky opacities": _chest_streaks,
    "blunting of the costophrenic angle":
        lambda rng, g, size, d: _chest_effusion(
            rng, g, size, d, lambda n: u(rng, 0.07, 0.11, n), 1.4),
    "meniscus-shaped homogeneous basal opacity":
        lambda rng, g, size, d: _chest_effusion(
            rng, g, size, d, lambda n: u(rng, 0.12, 0.2, n), 0.6),
}


def render(rng, variant, size, d, lesions=True):
  """variant: i32[N] index into the lesion list (-1: no lesion).

  Returns (image f32[N,H,W] in [0,1], mask bool[N,H,W]).
  """
  n = variant.shape[0]
  density, lungs, geom = _chest_anatomy(rng, n, size, d)
  mask = np.zeros((n, size, size), bool)
  yy, xx = grid(size)
  # Lesion geometry drawn for every image (keeps the random stream aligned).
  side_idx = rng.integers(0, 2, n)
  pick = lambda a: np.where(side_idx[:, None, None] == 0, a[0], a[1])
  lung, lung_cx = pick(lungs), pick(geom["lcx"])
  lung_rx, lung_ry = pick(geom["lrx"]), pick(geom["lry"])
  v = u(rng, -0.45, 0.5, n)
  ly = geom["lcy"] + v * lung_ry
  lx = lung_cx + u(rng, -0.4, 0.4, n) * lung_rx * (0.7 + 0.3 * v)
  r = u(rng, 0.06, 0.12, n) * geom["s"]
  contrast = u(rng, 0.75, 1.25, n) * 0.4 * (1 - 0.5 * d)
  names = list(LESIONS)
  for k in np.unique(variant[variant >= 0]):
    idx = np.flatnonzero(variant == k)
    g = dict(n=len(idx), yy=yy, xx=xx, ly=ly[idx], lx=lx[idx], r=r[idx],
             s=geom["s"][idx], lcy=geom["lcy"][idx], lung=lung[idx],
             lung_cx=lung_cx[idx], lung_rx=lung_rx[idx],
             lung_ry=lung_ry[idx], side=col(2.0 * side_idx[idx] - 1))
    opacity, env = LESIONS[names[k]](rng, g, size, d)
    density[idx] += lesions * contrast[idx] * opacity * lung[idx]
    mask[idx] = (env > 0.35) & (lung[idx] > 0.5)
  # Acquisition nuisance: exposure window, gamma, blur, noise.
  lo = u(rng, -0.06, 0.06, n)
  hi = u(rng, 0.72, 0.95, n)
  img = np.clip((density - lo) / (hi - lo), 0, 1)**u(rng, 0.8, 1.25, n)
  img = blur(img, rng.uniform(0.3, 0.9, n))
  img += u(rng, 0.01, 0.02 + 0.05 * d, n) * rng.standard_normal(
      img.shape, dtype=np.float32)
  return np.clip(img, 0, 1), mask
