"""Model-code variants the benchmarks can trace a step with, for A/B timing.

The benchmarks trace a step inside `variant(name)`; the change lives only
while the step is traced, so a baseline step and a variant step compiled in
one process can be timed in alternating rounds. Nothing here is imported by
hica_jax. A candidate change is prototyped here as a patch; once it pays off
it moves into hica_jax/models and its entry here becomes the "before"
(the code as it was), so the gain stays measurable without keeping two
copies of the change.

Variants (combine with "+", e.g. "plain_dense+jax_gelu"):
  baseline     the code as it is.
  plain_dense  flax Dense's own lax.dot_general, i.e. without
               models/vit.py's `dense_dot_general` (its custom VJP runs the
               weight gradient as a canonical dot; XLA:CPU's own dW = x^T g
               contracts the lhs's major dimension and runs at about half
               speed: BENCHMARKS.md, "Profile").
  jax_gelu     jax.nn.gelu(approximate=False) for "gelu" instead of
               models/vit.py's erf formula (XLA:CPU evaluates the former
               through erfc: an exp and two selects per element).
The third landed change, attention on [B, heads, L, dh] operands, is not
kept as a variant (it is a rewrite of SelfAttention, not a patch); its
before/after numbers are in BENCHMARKS.md.
"""
import contextlib

import jax

VARIANTS = ("baseline", "plain_dense", "jax_gelu", "plain_dense+jax_gelu")


def _patches(part):
  """(module, attribute, replacement) of one named variant."""
  from hica_jax.models import text  # pylint: disable=g-import-not-at-top
  from hica_jax.models import vit  # pylint: disable=g-import-not-at-top
  if part == "plain_dense":
    return [(vit, "dense_dot_general", jax.lax.dot_general)]
  if part == "jax_gelu":
    original = vit.activation

    def activation(name):
      if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
      return original(name)
    # text.py imports the function by name: patch both references.
    return [(vit, "activation", activation), (text, "activation", activation)]
  raise ValueError(f"variant part {part!r}: expected plain_dense or jax_gelu")


@contextlib.contextmanager
def _patched(module, name, value):
  saved = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, saved)


@contextlib.contextmanager
def variant(name):
  """Traces inside this context use the named variant of the model code."""
  with contextlib.ExitStack() as stack:
    for part in (name or "baseline").split("+"):
      if part != "baseline":
        for patch in _patches(part):
          stack.enter_context(_patched(*patch))
    yield
