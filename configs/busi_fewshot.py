"""Few-shot HiCA on breast ultrasound (synthetic default; BUSI with data.root).

  python -m hica_jax.main --config configs/busi_fewshot.py
  python -m hica_jax.main --config configs/busi_fewshot.py \
      --config.data.root=/data/Dataset_BUSI_with_GT
"""
from hica_jax import base_config


def get_config(arg=None):
  c = base_config.get_base_config("busi", arg, name="busi")
  # Ultrasound speckle: multiplicative noise in augmentation.
  c.data.augment.speckle = 0.1
  # SwAV's views on real ultrasound: left-right flips carry no meaning and
  # speckle varies between machines (docs/stage1_experiments.md).
  c.real.stage1.swav = dict(hflip=0.5, speckle=0.3)
  # BUSI's bank has phrases for benign and malignant, so the local term can
  # act without masks through class phrases; the study measures it.
  c.real.study.sweep = ("local_mode=attention,phrases=class",
                        "cross_weight=1.0", "init=image_stage1")
  return c
