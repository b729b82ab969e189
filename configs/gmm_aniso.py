"""SIM on an anisotropic Gaussian mixture in D dimensions (default 16): gmm2d's defaults on a mixture
whose components have per-coordinate stds spread over a factor of 10, unequal weights, random means.

  python -m simjax.main --config=configs/gmm_aniso.py:16 --workdir=/tmp/aniso16
  python -m simjax.main --config=configs/gmm_aniso.py:8 --workdir=/tmp/aniso8

The mixture is drawn from a fixed generator (numpy seed D), so each D names one mixture.
"""
import numpy as np

from simjax import config_files


def mixture(dim: int, num_modes: int):
  rng = np.random.default_rng(dim)
  means = rng.uniform(-2.0, 2.0, (num_modes, dim))
  stds = np.exp(rng.uniform(np.log(0.05), np.log(0.5), (num_modes, dim)))
  weights = rng.uniform(1.0, 3.0, num_modes)
  weights = np.round(weights / weights.sum(), 6)
  weights[-1] = round(1.0 - weights[:-1].sum(), 6)
  as_tuple = lambda a: tuple(tuple(round(float(v), 4) for v in row) for row in a)
  return as_tuple(means), as_tuple(stds), tuple(float(w) for w in weights)


def get_config(arg=None):
  dim = int(arg) if arg else 16
  c = config_files.sibling(__file__, "gmm2d").get_config()
  c.teacher.means, c.teacher.stds, c.teacher.weights = mixture(dim, num_modes=max(4, dim // 2 + 2))
  return c
