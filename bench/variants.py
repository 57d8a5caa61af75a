"""Candidate changes to the hica-jax model, prototyped for measurement only.

The benchmarks trace a step inside `variant(name)`; the change lives only
while the step is traced, so a baseline step and a variant step compiled in
one process can be timed in alternating rounds. Nothing here is imported by
hica_jax; a variant that pays off is proposed as a diff to
hica_jax/models/vit.py (BENCHMARKS.md, "Profile").

Variants (combine with "+", e.g. "dense_vjp+erf_gelu"):
  baseline   the code as it is.
  dense_vjp  every flax Dense (q/k/v/out, fc1/fc2, projections) uses
             `dense_dot_general`: the same forward matmul, and a backward
             pass whose weight gradient is a canonical [K, T] x [T, N] dot on
             an explicitly transposed activation. XLA:CPU otherwise emits
             dW = x^T g as a dot contracting the lhs's major dimension, which
             YNNPACK does not take and the fallback runs at about half the
             speed of a canonical dot (bench/profile_step.py: the top
             instructions of the step are these dots).
  erf_gelu   exact GELU as 0.5 x (1 + erf(x / sqrt 2)) (torch's formula)
             instead of jax.nn.gelu(approximate=False), which XLA:CPU
             evaluates through erfc (an exp and two selects per element).
  attn_bhld  attention on [batch, heads, tokens, head_dim] operands: q, k, v
             are transposed once after their projections and the two
             einsums are batch-major ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"),
             instead of "bqhd,bkhd->bhqk" / "bhqk,bkhd->bqhd", which XLA:CPU
             runs as strided batched dots plus transposes.
"""
import contextlib

import jax
import jax.numpy as jnp

VARIANTS = ("baseline", "dense_vjp", "erf_gelu", "attn_bhld",
            "dense_vjp+erf_gelu", "dense_vjp+erf_gelu+attn_bhld")


@jax.custom_vjp
def _dense_matmul(x, w):
  return jnp.dot(x, w)


def _dense_matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _barrier(a):
  """On CPU, stops XLA from folding a neighbouring transpose into a dot
  (which makes the dot non-canonical again)."""
  if jax.default_backend() == "cpu":
    return jax.lax.optimization_barrier(a)
  return a


def _dense_matmul_bwd(res, g):
  x, w = res
  k, n = w.shape
  dx = jnp.dot(g, w.T)
  x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
  # Transpose the narrower of the two [T, .] operands (T = all tokens): a
  # [T, 1024] transpose costs as much as the dot it speeds up.
  if k <= n:
    dw = jnp.dot(_barrier(x2.T), g2)
  else:
    dw = _barrier(jnp.dot(_barrier(g2.T), x2)).T
  return dx, dw.astype(w.dtype)


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """lax.dot_general with a faster backward for Dense's x[..., K] @ w[K, N]."""
  standard = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (rhs.ndim == 2 and precision is None and preferred_element_type is None
      and tuple(map(tuple, dimension_numbers[0])) == standard[0]
      and not any(dimension_numbers[1])):
    return _dense_matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


class _LaxWithDenseVjp:
  """jax.lax, with dot_general replaced (what flax.linen.linear sees)."""

  def __getattr__(self, name):
    return getattr(jax.lax, name)

  dot_general = staticmethod(dense_dot_general)


def erf_gelu(x):
  """Exact GELU, torch's formula (equal to jax.nn.gelu(x, False) to 1e-6)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))


def _to_bhld(t):
  return t.transpose(0, 2, 1, 3)


def bhld_einsum(spec, *operands, **kwargs):
  """jnp.einsum, with SelfAttention's two specs run batch-major."""
  if spec == "bqhd,bkhd->bhqk":
    q, k = operands
    return jnp.einsum("bhqd,bhkd->bhqk", _to_bhld(q), _to_bhld(k), **kwargs)
  if spec == "bhqk,bkhd->bqhd":
    w, v = operands
    return _to_bhld(jnp.einsum("bhqk,bhkd->bhqd", w, _to_bhld(v), **kwargs))
  return jnp.einsum(spec, *operands, **kwargs)


class _JnpWithBhldEinsum:
  """jax.numpy, with einsum replaced (what hica_jax.models.vit sees)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  einsum = staticmethod(bhld_einsum)


@contextlib.contextmanager
def _patched(module, name, value):
  saved = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, saved)


def _patches(part):
  """(module, attribute, replacement) of one named variant."""
  if part == "dense_vjp":
    import flax.linen.linear as linear  # pylint: disable=g-import-not-at-top
    return linear, "lax", _LaxWithDenseVjp()
  if part == "erf_gelu":
    from hica_jax.models import vit  # pylint: disable=g-import-not-at-top
    original = vit.activation
    return vit, "activation", (
        lambda name: erf_gelu if name == "gelu" else original(name))
  if part == "attn_bhld":
    from hica_jax.models import vit  # pylint: disable=g-import-not-at-top
    return vit, "jnp", _JnpWithBhldEinsum()
  raise ValueError(f"variant part {part!r}: expected dense_vjp, erf_gelu or "
                   "attn_bhld")


@contextlib.contextmanager
def variant(name):
  """Traces inside this context use the named variant of the model code."""
  with contextlib.ExitStack() as stack:
    for part in (name or "baseline").split("+"):
      if part != "baseline":
        stack.enter_context(_patched(*_patches(part)))
    yield
