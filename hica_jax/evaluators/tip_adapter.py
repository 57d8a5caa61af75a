"""Tip-Adapter: training-free, the zero-shot logits plus a cache of the
frozen stage-1 embeddings of the support set."""
import jax
import jax.numpy as jnp
import numpy as np


def tip_adapter_probs(test_emb, support_emb, support_labels, prototypes,
                      scale, num_classes, alpha=1.0, beta=5.5):
  """f[N_test, K]: softmax of s g C^T + alpha s exp(-beta (1 - g F^T)) L,
  F the normalised support embeddings f[N_sup, d], L their one-hot labels,
  C the prototypes f[K, d]. All embeddings normalised."""
  affinity = test_emb @ support_emb.T
  cache = np.exp(-beta * (1.0 - affinity)) @ np.eye(num_classes)[
      support_labels]
  logits = scale * test_emb @ prototypes.T + alpha * scale * cache
  return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def cell(env, k, seed):
  support = env.support(k, seed)
  sup = env.frozen_embeddings(env.stage1, support["image"])
  test = env.frozen
  probs = tip_adapter_probs(test["emb"], sup["emb"], support["label"],
                            test["prototypes"], test["scale"],
                            env.num_classes)
  return {"metrics": env.seen_metrics(probs)}
