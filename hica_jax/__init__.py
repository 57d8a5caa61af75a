"""hica-jax: HiCA in JAX/Flax."""
