"""The embedded default: train an EDM teacher on scikit-learn's 8x8 digits, distill it with SIM, evaluate.

  python -m simjax.main --config=configs/digits.py --workdir=workdirs/digits

Real data with no download; all stages resume from the workdir. Class-conditional variant:
  --config.label_dim=10
"""
import ml_collections

from simjax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  del arg
  c = common.image_config()
  c.data.name = "digits"
  c.data.shape = (8, 8, 1)
  c.data.holdout_fraction = 0.2
  c.data.split_seed = 0
  c.label_dim = 0

  # A small SongUNet (EDM's DDPM++ family) trained here with EDM's loss.
  c.teacher.kind = "train"
  c.teacher.arch = ml_collections.ConfigDict(dict(
      preset="ddpmpp", model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
      dropout=0.1, augment_dim=0, channel_mult_emb=2))
  tt = c.teacher_train
  tt.num_steps = 2000
  tt.batch_size = 128
  tt.optim.lr = 1e-3
  tt.optim.warmup_steps = 200
  tt.ema_half_life_images = 25_000.0
  tt.log_every = 200
  tt.checkpoint_every = 1000

  # SIM: generator and fake score start as copies of the teacher.
  c.batch_size = 64
  c.num_steps = 2000
  # As on the analytic teacher, the fake score learns faster than the generator so it keeps up.
  c.optim.generator.lr = 5e-5
  c.optim.fake.lr = 2e-4
  c.ema_half_life_images = 10_000.0
  c.log_every = 100
  c.checkpoint_every = 200
  c.grid_every = 200

  c.eval.features = "digit_classifier"
  c.eval.every = 400
  c.eval.periodic_samples = 2000
  c.eval.num_samples = 10_000
  c.eval.batch_size = 1000
  c.eval.num_classes = 10
  return c
