"""Numeric building blocks of the synthetic images (vectorised numpy).

Fields are f32[N, H, W]; coordinates are in [0, 1] of the image side;
per-image scalars are [N] and broadcast as [N, 1, 1]. Pixel grids, per-image
uniform draws, soft inside/outside of signed distances, Gaussian blur (FFT),
smooth noise, polar frames, radial harmonics and spikes, (super-)ellipses and
lines: what `synthetic_chestxray` and `synthetic_busi` draw anatomy and
lesions with.
"""
import numpy as np


def grid(size):
  """Pixel-centre coordinates (yy, xx), each f32[1, H, W] in [0, 1]."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  yy, xx = np.meshgrid(c, c, indexing="ij")
  return yy[None], xx[None]


def col(a):
  """[N] -> f32[N, 1, 1]."""
  return np.asarray(a, np.float32).reshape(-1, 1, 1)


def u(rng, lo, hi, n):
  """U(lo, hi) drawn once per image, as f32[N, 1, 1]."""
  return col(rng.uniform(lo, hi, n))


def sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def soft_inside(sd, edge):
  """Soft indicator of sd < 0 (sd in pixels) with edge width `edge` pixels."""
  return sigmoid(-sd / np.maximum(edge, 1e-3)).astype(np.float32)


def blur(x, sigma_y, sigma_x=None, periodic=False):
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


def noise(rng, n, size, sigma_y, sigma_x=None):
  """Smooth Gaussian noise f32[N, H, W], unit std per image."""
  z = blur(rng.standard_normal((n, size, size), dtype=np.float32),
            sigma_y, sigma_x, periodic=True)
  return z / (z.std(axis=(1, 2), keepdims=True) + 1e-6)


def polar(yy, xx, cy, cx, aspect, angle):
  """Polar coordinates around (cy, cx) of an ellipse frame.

  aspect: width/height of the frame; angle: rotation in radians. Returns
  (rho, theta) f32[N, H, W]; rho is in image units of the geometric-mean
  radius, so a circle of radius r in the frame is rho < r.
  """
  dy, dx = yy - cy, xx - cx
  c, s = np.cos(angle), np.sin(angle)
  fx = (c * dx + s * dy) / np.sqrt(aspect)  # frame coordinates
  fy = (-s * dx + c * dy) * np.sqrt(aspect)
  return np.sqrt(fx * fx + fy * fy), np.arctan2(fy, fx)


def harmonics(rng, theta, amp_lo, amp_hi, orders):
  """sum_k a_k cos(k theta + phi_k), a_k ~ U(amp_lo, amp_hi) per image."""
  n = theta.shape[0]
  out = np.zeros_like(theta)
  for k in orders:
    a = u(rng, amp_lo, amp_hi, n)
    out += a * np.cos(k * theta + u(rng, 0, 2 * np.pi, n))
  return out


def radial_spikes(rng, theta, count, amp_lo, amp_hi, sharpness):
  """Narrow radial spikes: sum_s b_s max(0, cos(theta - psi_s))^sharpness."""
  n = theta.shape[0]
  out = np.zeros_like(theta)
  for _ in range(count):
    c = np.maximum(np.cos(theta - u(rng, 0, 2 * np.pi, n)), 0.0)
    out += u(rng, amp_lo, amp_hi, n) * c**sharpness
  return out


def ellipse_sd(yy, xx, cy, cx, ry, rx, size, power=2.0):
  """Approximate signed distance (pixels) to a (super-)ellipse."""
  q = np.abs((yy - cy) / ry)**power + np.abs((xx - cx) / rx)**power
  return (q**(1.0 / power) - 1.0) * np.minimum(rx, ry) * size


def line_dist(yy, xx, y0, x0, angle, size):
  """(|distance| across, signed distance along) pixels to a line."""
  dy, dx = yy - y0, xx - x0
  c, s = np.cos(angle), np.sin(angle)
  return np.abs(-s * dx + c * dy) * size, (c * dx + s * dy) * size


def lines(proj, period, width, size):
  """Thin periodic lines along `proj` (image units): f32 in [0, 1]."""
  t = (proj / period) % 1.0 - 0.5
  return np.exp(-((t * period * size) / width)**2)

