"""SIM on a 5x5 grid of equal 2-D Gaussians (25 modes): gmm2d's defaults on a mixture with many modes.

  python -m simjax.main --config=configs/gmm_grid25.py --workdir=/tmp/grid25
"""
from simjax import config_files


def get_config(arg=None):
  c = config_files.sibling(__file__, "gmm2d").get_config(arg)
  c.teacher.means = tuple((float(i), float(j)) for i in range(-2, 3) for j in range(-2, 3))
  c.teacher.stds = (0.1,) * 25
  c.teacher.weights = (0.04,) * 25
  return c
