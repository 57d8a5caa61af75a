"""The tfds feature spec shared by every builder (synthetic and real).

Images and masks are stored as encoded PNG bytes so that tfds needs no
TensorFlow to write or read `array_record` files.
"""
import numpy as np
import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a data set built only from local files.

  tfds constructs a builder whose data is not prepared yet by first
  looking for precomputed metadata in its public bucket, and makes an
  empty temporary folder for it (`tempfile.mkdtemp("tfds")`) that it never
  removes: one stray folder in the temp dir per build. None of our data
  sets is in that bucket, so there is nothing to look for.
  """

  def initialize_from_bucket(self):
    return None


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
