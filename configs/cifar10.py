"""SIM reproduction on CIFAR-10, unconditional (Luo et al. 2024: FID 2.06 at 1 NFE), from EDM's teacher.

  python -m simjax.main --config=configs/cifar10.py:/path/to/edm-cifar10-32x32-uncond-vp.pkl \
      --workdir=gs://bucket/sim-cifar10 \
      --config.eval.inception_path=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --config.data.data_dir=/path/to/tfds            # or --config.eval.fid_ref=cifar10-32x32.npz

The teacher may be a published EDM pickle, a state dict or a directory written by
`python -m simjax.convert_edm`; the argument after ':' (or --config.teacher.checkpoint) names it.
No training data is used for distillation; CIFAR-10 enters only for FID reference statistics.
"""
from simjax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  c = common.image_config()
  c.data.name = "cifar10"
  c.data.shape = (32, 32, 3)
  c.label_dim = 0
  c.teacher.kind = "checkpoint"
  c.teacher.checkpoint = arg or ""

  # DESIGN.md section 1 / SIM defaults.
  c.batch_size = 256
  # SiD's released unconditional CIFAR-10 generator is the snapshot at 403,968 kimg: at batch 256 that is
  # 1,578,000 steps (SIM reports its FID after a comparable budget; --config.num_steps shortens a run).
  c.num_steps = 1_578_000
  c.optim.generator.lr = 1e-5
  c.optim.fake.lr = 1e-5
  c.ema_half_life_images = 500_000.0
  c.ema_rampup_ratio = 0.05
  c.sigma_init = 2.5
  c.loss.distance = "pseudo_huber"
  c.loss.t_max = 0.8                # sigma in [0.002, 24.4], SiD's --tmax 800

  c.log_every = 100
  c.checkpoint_every = 2000
  c.grid_every = 5000
  c.eval.features = "inception"
  c.eval.num_samples = 50_000
  c.eval.batch_size = 500
  return c
