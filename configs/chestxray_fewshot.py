"""Few-shot HiCA on chest X-ray (synthetic default; Kermany with data.root).

  python -m hica_jax.main --config configs/chestxray_fewshot.py
  python -m hica_jax.main --config configs/chestxray_fewshot.py \
      --config.data.root=/data/chest_xray
"""
from hica_jax import base_config


def get_config(arg=None):
  return base_config.get_base_config("kermany", arg, name="chestxray")
