"""The tfds feature spec shared by every builder (synthetic and real).

Images and masks are stored as encoded PNG bytes so that tfds needs no
TensorFlow to write or read `array_record` files.
"""
import numpy as np
import tensorflow_datasets as tfds


def features(categories):
  """Feature dict for a data set whose labels are `categories` (list of str)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
      "label": tfds.features.ClassLabel(names=list(categories)),
      "text": tfds.features.Text(),
      "phrase": tfds.features.Text(),
      "has_roi": tfds.features.Scalar(np.int32),
      "id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
  })
