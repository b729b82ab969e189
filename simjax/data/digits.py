"""The 8x8 handwritten digits that ship inside scikit-learn: real data with no download.

1,797 images, 10 classes, pixel values 0..16; simjax uses NHWC [N, 8, 8, 1] in [-1, 1] and a fixed,
stratified train / held-out split (the held-out digits are the evaluation's noise floor).
"""
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
  x: np.ndarray       # [N, 8, 8, 1] float32 in [-1, 1]
  labels: np.ndarray  # [N] int32


def load_digits_splits(holdout_fraction: float = 0.2, seed: int = 0):
  """(train, heldout) splits, stratified per class, deterministic in `seed`."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel  # optional at import time
  bunch = load_digits()
  x = (bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
  y = bunch.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  held = np.zeros(len(y), bool)
  for c in range(10):
    idx = np.flatnonzero(y == c)
    held[rng.permutation(idx)[: int(round(holdout_fraction * len(idx)))]] = True
  return Split(x[~held], y[~held]), Split(x[held], y[held])
