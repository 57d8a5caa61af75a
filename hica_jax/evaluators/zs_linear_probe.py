"""ZS-LP (CLAP-style): a linear probe on the frozen stage-1 embeddings,
initialised from the text prototypes and anchored to them."""
import jax
import jax.numpy as jnp
import numpy as np
import optax


def zs_linear_probe_probs(support_emb, support_labels, test_emb, prototypes,
                          scale, steps=300, lr=0.05, anchor=1.0):
  """f[N_test, K]: minimises CE(s g W^T, y) + anchor * ||W - C||^2 from
  W = C (C: prototypes f[K, d]), so with few shots the classifier stays near
  the zero-shot one. Embeddings normalised, f[N, d]."""
  c = jnp.asarray(prototypes)
  x, y = jnp.asarray(support_emb), jnp.asarray(support_labels)

  def loss_fn(w):
    ce = optax.softmax_cross_entropy_with_integer_labels(scale * x @ w.T, y)
    return ce.mean() + anchor * jnp.sum((w - c) ** 2)

  tx = optax.adam(lr)

  @jax.jit
  def fit(w):
    def body(carry, _):
      w, opt = carry
      g = jax.grad(loss_fn)(w)
      upd, opt = tx.update(g, opt)
      return (optax.apply_updates(w, upd), opt), None
    (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
    return w

  w = fit(c)
  return np.asarray(jax.nn.softmax(scale * jnp.asarray(test_emb) @ w.T, -1))


def cell(env, k, seed):
  support = env.support(k, seed)
  sup = env.frozen_embeddings(env.stage1, support["image"])
  test = env.frozen
  probs = zs_linear_probe_probs(sup["emb"], support["label"], test["emb"],
                                test["prototypes"], test["scale"])
  return {"metrics": env.seen_metrics(probs)}
