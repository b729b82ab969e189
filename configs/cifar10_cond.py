"""SIM reproduction on CIFAR-10, class-conditional (Luo et al. 2024: FID 1.96 at 1 NFE), from EDM's teacher.

  python -m simjax.main --config=configs/cifar10_cond.py:/path/to/edm-cifar10-32x32-cond-vp.pkl \
      --workdir=gs://bucket/sim-cifar10-cond \
      --config.eval.inception_path=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --config.data.data_dir=/path/to/tfds

Everything else as configs/cifar10.py.
"""
from simjax import config_files


def get_config(arg=None):
  c = config_files.sibling(__file__, "cifar10").get_config(arg)
  c.label_dim = 10
  return c
