"""The breast-ultrasound-like synthetic family: anatomy, lesions, rendering.

Intensity is echogenicity. `render` draws layered tissue (skin, fat,
fibroglandular tissue, muscle) with class-independent distractors (fat
lobules, Cooper ligaments), then one mass variant per image (`LESIONS`:
oval/circumscribed, irregular/spiculated or anechoic masses with their
posterior acoustic column; keys are the bank's local phrases of
`banks/synthetic_busi.json`), then speckle and the acquisition nuisance.
"""
import numpy as np

from hica_jax.data.synthetic_fields import (blur, col, grid, harmonics, noise,
                                            polar, radial_spikes, sigmoid,
                                            soft_inside, u)


def _wave(rng, xx, amp, n):
  out = 0
  for _ in range(2):
    out = out + u(rng, 0, amp, n) * np.sin(
        2 * np.pi * u(rng, 0.5, 2.0, n) * xx + u(rng, 0, 6.3, n))
  return out


def _busi_anatomy(rng, n, size, d):
  """Layered tissue echogenicity + class-independent distractors.

  Returns (echo f32[N,H,W], geometry dict).
  """
  yy, xx = grid(size)
  y_skin = u(rng, 0.015, 0.04, n)
  y_fat = y_skin + u(rng, 0.1, 0.2, n) + _wave(rng, xx, 0.02, n)
  y_gland = y_fat + u(rng, 0.38, 0.5, n) + _wave(rng, xx, 0.04, n)
  y_retro = y_gland + u(rng, 0.02, 0.05, n)
  y_muscle = y_retro + u(rng, 0.1, 0.16, n)
  below = lambda y: sigmoid((yy - y) * size / 0.8)
  e_fat = u(rng, 0.28, 0.38, n)
  e_gland = u(rng, 0.55, 0.72, n)
  gland_tex = e_gland * (1 + 0.25 * noise(rng, n, size, 1.0, 2.5))
  tilt = u(rng, -0.15, 0.15, n)
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
    on = col(rng.uniform(size=n) < 0.6)
    ly = y_skin + u(rng, 0.05, 0.45, n)
    lx = u(rng, 0.1, 0.9, n)
    rho, _ = polar(yy, xx, ly, lx, u(rng, 1.5, 2.6, n), u(rng, -0.3, 0.3, n))
    lob = on * soft_inside((rho - u(rng, 0.03, 0.07, n)) * size, 1.2)
    echo = echo * (1 - lob) + lob * e_fat * u(rng, 0.8, 1.0, n)
  # Cooper ligaments: thin bright curves in the fat/gland.
  for _ in range(3):
    yc = y_fat + u(rng, -0.06, 0.12, n) + _wave(rng, xx, 0.04, n)
    echo += u(rng, 0.15, 0.4, n) * np.exp(-((yy - yc) * size / 0.6)**2) * (
        1 - below(y_gland))
  geom = dict(y_fat=y_fat, y_gland=y_gland, e_gland=e_gland, e_fat=e_fat)
  return echo.astype(np.float32), geom


def _mass(rng, g, size, aspect, harm, spikes=None, edge=0.7):
  """Star-shaped mass: returns signed distance (pixels) and soft interior."""
  n = g["n"]
  rho, th = polar(g["yy"], g["xx"], g["ly"], g["lx"], aspect(n),
                   u(rng, -0.25, 0.25, n))
  r = 1 + harmonics(rng, th, *harm)
  if spikes:
    r = r + radial_spikes(rng, th, *spikes)
  sd = (rho - g["r"] * r) * size
  return sd, soft_inside(sd, edge)


def _column(g, size, half_width):
  """Posterior acoustic column below the mass centre, f32 in [0, 1]."""
  across = np.abs(g["xx"] - g["lx"]) - half_width
  return soft_inside(across * size, 1.5) * sigmoid(
      (g["yy"] - g["ly"]) * size / 2.0)


def _heterogeneous(rng, g, size, echo_in):
  n = g["n"]
  calc = sigmoid((noise(rng, n, size, 0.6) - 2.0) * 5)
  return np.maximum(echo_in * (1 + 0.5 * noise(rng, n, size, 1.0)), 0), calc


def _lesion(inside, echo_in, speckle=1.0, add=0.0, post=1.0, mask=None):
  return dict(inside=inside, echo=echo_in, speckle=speckle, add=add,
              post=post, mask=inside > 0.5 if mask is None else mask)


def _busi_oval(rng, g, size, d):
  _, inside = _mass(rng, g, size, lambda n: u(rng, 1.35, 2.1, n),
                    (0.0, 0.03 + 0.08 * d, (2, 3, 4)))
  return _lesion(inside, g["echo_in"], speckle=0.8)


def _busi_lobulated(rng, g, size, d):
  _, inside = _mass(rng, g, size, lambda n: u(rng, 1.2, 1.8, n),
                    (0.1, 0.18, (2, 3)))
  return _lesion(inside, g["echo_in"], speckle=0.8)


def _busi_capsule(rng, g, size, d):
  sd, inside = _mass(rng, g, size, lambda n: u(rng, 1.3, 2.0, n),
                     (0.0, 0.03 + 0.08 * d, (2, 3)))
  rim = 0.35 * np.exp(-(sd / 0.7)**2)
  return _lesion(inside, g["echo_in"], speckle=0.8, add=rim)


def _busi_spiculated(rng, g, size, d):
  spike = 0.6 * (1 - 0.5 * d)
  _, inside = _mass(rng, g, size, lambda n: u(rng, 0.9, 1.4, n),
                    (0.04, 0.12, (2, 3, 5)),
                    spikes=(10, 0.5 * spike, spike, 30), edge=0.5)
  echo_in, calc = _heterogeneous(rng, g, size, g["echo_in"])
  return _lesion(inside, echo_in, add=0.5 * calc * inside)


def _busi_angular(rng, g, size, d):
  n = g["n"]
  rho, th = polar(g["yy"], g["xx"], g["ly"], g["lx"], u(rng, 0.9, 1.5, n),
                   u(rng, -0.25, 0.25, n))
  # Polygon radius (angular corners) + microlobulation.
  sides = col(rng.integers(4, 7, n))
  sector = 2 * np.pi / sides
  phase = (th + u(rng, 0, np.pi, n)) % sector - sector / 2
  r = 1.15 * np.cos(np.pi / sides) / np.cos(phase)  # ~ the area of a disc
  r = r + harmonics(rng, th, 0.03, 0.06 * (1 - 0.5 * d) + 0.02, (9, 12))
  inside = soft_inside((rho - g["r"] * r) * size, 0.5)
  echo_in, calc = _heterogeneous(rng, g, size, g["echo_in"])
  return _lesion(inside, echo_in, add=0.4 * calc * inside)


def _busi_shadowing(rng, g, size, d):
  _, inside = _mass(rng, g, size, lambda n: u(rng, 0.9, 1.5, n),
                    (0.06, 0.16, (2, 3, 4, 6)), edge=0.6)
  echo_in, _ = _heterogeneous(rng, g, size, g["echo_in"])
  shadow = u(rng, 0.35, 0.65, g["n"]) * (1 - 0.4 * d)
  post = 1 - shadow * _column(g, size, 0.8 * g["r"]) * (1 - inside)
  return _lesion(inside, echo_in, post=post)


def _busi_taller(rng, g, size, d):
  sd, inside = _mass(rng, g, size, lambda n: u(rng, 0.5, 0.8, n),
                     (0.05, 0.14, (2, 3, 5)), edge=0.6)
  halo = soft_inside(sd - 2.5, 0.7) * sigmoid(sd / 0.7)
  echo_in, _ = _heterogeneous(rng, g, size, g["echo_in"])
  return _lesion(inside, echo_in, add=0.3 * halo)


def _busi_cyst(rng, g, size, d, aspect, wall, enhance):
  sd, inside = _mass(rng, g, size, aspect, (0.0, 0.02, (2,)), edge=0.5)
  post = 1 + enhance(g["n"]) * _column(g, size, 0.8 * g["r"]) * (1 - inside)
  return _lesion(inside, 0.02, speckle=0.05,
                 add=wall * np.exp(-(sd / 0.6)**2), post=post)


LESIONS = {
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
            rng, g, size, d, lambda n: u(rng, 1.0, 1.25, n), 0.25,
            lambda n: u(rng, 0.4, 0.7, n)),
    "oval anechoic cyst with thin echogenic wall":
        lambda rng, g, size, d: _busi_cyst(
            rng, g, size, d, lambda n: u(rng, 1.4, 2.0, n), 0.45,
            lambda n: u(rng, 0.2, 0.4, n)),
}


def render(rng, variant, size, d, lesions=True):
  """variant: i32[N] index into the lesion list (-1: no lesion).

  Returns (image f32[N,H,W] in [0,1], mask bool[N,H,W]).
  """
  n = variant.shape[0]
  yy, xx = grid(size)
  echo, geom = _busi_anatomy(rng, n, size, d)
  # Lesion geometry for every image (keeps the random stream aligned).
  lx = u(rng, 0.25, 0.75, n)
  top = np.take_along_axis(geom["y_fat"][:, 0], np.clip(
      (lx[:, 0] * size).astype(int), 0, size - 1), axis=1)[:, :, None]
  ly = np.clip(top + u(rng, 0.1, 0.3, n), 0.2, 0.65)
  r = u(rng, 0.08, 0.16, n)
  # Lesion echogenicity relative to the gland: closer to fat with d.
  echo_in = geom["e_gland"] * (1 - u(rng, 0.65, 0.9, n) * (1 - 0.4 * d))
  speck = np.ones_like(echo)
  add = np.zeros_like(echo)
  post = np.ones_like(echo)
  mask = np.zeros((n, size, size), bool)
  names = list(LESIONS)
  for k in np.unique(variant[variant >= 0]):
    idx = np.flatnonzero(variant == k)
    g = dict(n=len(idx), yy=yy, xx=xx, ly=ly[idx], lx=lx[idx], r=r[idx],
             echo_in=echo_in[idx])
    les = LESIONS[names[k]](rng, g, size, d)
    mask[idx] = les["mask"]
    if not lesions:
      continue
    echo[idx] = echo[idx] * (1 - les["inside"]) + les["inside"] * les["echo"]
    speck[idx] = 1 - les["inside"] * (1 - les["speckle"])
    add[idx] = les["add"]
    post[idx] = les["post"]
  # Fully developed speckle: |complex Gaussian|, laterally elongated, mean 1.
  grain = u(rng, 0.8, 1.3, n)[:, 0, 0]
  re = blur(rng.standard_normal(echo.shape, dtype=np.float32),
             0.6 * grain, 1.1 * grain, periodic=True)
  im = blur(rng.standard_normal(echo.shape, dtype=np.float32),
             0.6 * grain, 1.1 * grain, periodic=True)
  speckle = np.hypot(re, im)
  speckle /= speckle.mean(axis=(1, 2), keepdims=True)
  img = echo * (1 + (0.5 + 0.3 * d) * (speckle - 1) * speck) + add
  img = img * post
  # Acquisition nuisance: gain, depth attenuation, gamma, blur, noise.
  img *= u(rng, 0.75, 1.2, n) * np.exp(-u(rng, 0.2, 1.2, n) * yy)
  img = np.clip(img, 0, None)**u(rng, 0.75, 1.15, n)
  img = blur(img, rng.uniform(0.3, 0.7, n))
  img += u(rng, 0.01, 0.02 + 0.05 * d, n) * rng.standard_normal(
      img.shape, dtype=np.float32)
  return np.clip(img, 0, 1), mask
