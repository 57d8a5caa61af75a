"""GradCache (Gao et al. 2021): a contrastive loss over a batch larger than
the towers' activations fit, with gradients equal to the full batch's.

The towers embed the batch in `accum_steps` chunks without keeping
activations; the loss and its gradient w.r.t. the embeddings are computed on
the whole batch (every negative stays in); then each chunk is re-embedded and
back-propagated with its slice of those embedding gradients. Works for any
(embed_fn, loss_of_embeddings) pair whose embed_fn is deterministic.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from hica_jax import sharding


def to_chunks(x, chunks, shards):
  """[B, ...] -> [chunks, B/chunks, ...].

  Chunk c takes rows [c*m, (c+1)*m) of every one of the `shards` data shards
  (m = B / (shards * chunks)), so every device works on every chunk and
  chunking moves no data between devices.
  """
  m = x.shape[0] // (shards * chunks)
  x = x.reshape((shards, chunks, m) + x.shape[1:]).swapaxes(0, 1)
  return x.reshape((chunks, shards * m) + x.shape[3:])


def from_chunks(x, shards):
  """Inverse of to_chunks: [chunks, B/chunks, ...] -> [B, ...]."""
  chunks, n = x.shape[:2]
  x = x.reshape((chunks, shards, n // shards) + x.shape[2:]).swapaxes(0, 1)
  return x.reshape((chunks * n,) + x.shape[3:])


def check_accum_steps(accum_steps, global_batch, mesh, field="stage2"):
  """ValueError unless accum_steps chunks split every data shard evenly."""
  shards = sharding.data_size(mesh)
  if accum_steps < 1 or global_batch % (accum_steps * shards):
    raise ValueError(
        f"{field}.accum_steps={accum_steps} must be >= 1 and divide "
        f"{field}.batch_size={global_batch} into equal chunks on each of the "
        f"{shards} data shards; choose a divisor of {global_batch // shards}.")


def loss_and_grads(embed_fn, loss_of_embeddings, params, inputs,
                   accum_steps, mesh=None):
  """(loss, aux, grads) of loss_of_embeddings(embed_fn(params, inputs), params).

  Args:
    embed_fn: (params, inputs chunk {name: [b, ...]}) -> {name: [b, ...]}
      embeddings; deterministic (no dropout rng).
    loss_of_embeddings: (embeddings {name: [B, ...]}, params) -> (loss, aux);
      params enter directly where the loss reads them (a logit scale,
      descriptors it embeds itself), and their gradient is added.
    inputs: {name: [B, ...]} tower inputs of the global batch B.
    accum_steps: chunks; B must divide into accum_steps x data shards.
    mesh: the mesh whose "data" axis splits B, or None.
  """
  shards = 1 if mesh is None else sharding.data_size(mesh)
  chunks = {k: to_chunks(v, accum_steps, shards) for k, v in inputs.items()}
  if mesh is not None:
    chunks = jax.lax.with_sharding_constraint(
        chunks, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))
  # 1. Embeddings of the whole batch, chunk by chunk, outside autodiff.
  embeddings = jax.lax.map(lambda c: embed_fn(params, c), chunks)
  embeddings = {k: from_chunks(v, shards) for k, v in embeddings.items()}
  # 2. Loss on the whole batch; its gradient w.r.t. the embeddings and
  # w.r.t. params where they enter the loss directly.
  (loss, aux), (g_emb, grads) = jax.value_and_grad(
      loss_of_embeddings, argnums=(0, 1), has_aux=True)(embeddings, params)
  # 3. Per-chunk backward through the towers.
  g_chunks = {k: to_chunks(v, accum_steps, shards) for k, v in g_emb.items()}

  def backward(acc, xs):
    chunk, cotangent = xs
    _, vjp = jax.vjp(lambda p: embed_fn(p, chunk), params)
    return jax.tree.map(jnp.add, acc, vjp(cotangent)[0]), None

  grads, _ = jax.lax.scan(backward, grads, (chunks, g_chunks))
  return loss, aux, grads
