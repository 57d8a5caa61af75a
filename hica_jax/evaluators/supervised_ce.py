"""Supervised CE: the image tower and a linear head fine-tuned with
cross-entropy on the support set, from the stage-1 model (the same
initialisation as HiCA), with stage 2's optimiser and steps."""
from hica_jax import predict
from hica_jax.training import supervised


def cell(env, k, seed):
  result = supervised.train(env.ctx, env.stage1, env.support_indices(k, seed),
                            env.steps(k), seed,
                            desc=f"supervised_ce K={k} seed={seed}")
  probs = predict.batched_apply(supervised.probs_fn(env.model),
                                result.state.params, [env.seen_images],
                                env.batch_size,
                                env.mesh)
  return {"metrics": env.seen_metrics(probs)}
