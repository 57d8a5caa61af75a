"""Model towers and the HiCA dual encoder (see docs/design.md, "Model")."""
from hica_jax.models.hica_model import HiCAModel, build_model

__all__ = ["HiCAModel", "build_model"]
