"""SIM on class-conditional ImageNet 64x64 from EDM's ADM teacher (edm-imagenet-64x64-cond-adm.pkl, 296M
parameters, EDM's DhariwalUNet), with SiD's settings for this data set.

  python -m simjax.main --config=configs/imagenet64.py:/path/to/edm-imagenet-64x64-cond-adm.pkl \
      --workdir=gs://bucket/sim-imagenet64 \
      --config.eval.inception_path=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --config.eval.fid_ref=/path/to/imagenet-64x64.npz      # EDM's fid-refs statistics file

No data set is read (data.name 'none'): distillation is data-free and FID is against the reference
statistics given by path. SiD's run_sid.sh 'imagenet64-cond': batch 8192, Adam lr 4e-6 for both networks,
tmax 800 (sigma in [0.002, 24.4]), init_sigma 2.5, dropout 0.1, no augmentation, EMA half-life 2 Mimg,
--ls 1 --lsg 100 (loss scales; no-ops under Adam here), fp16 (bfloat16 here on accelerators, perf.compute_dtype
'auto'), duration 500 Mimg at alpha 1 (1000 at alpha 1.2), i.e. 61,035 steps at batch 8192 (num_steps below).

What it takes (benchmarks/sim_step.py --config=configs/imagenet64.py --batch=1 --iteration_only --repeats=3, one SIM iteration of
three 296M-parameter networks, float32; see the README's "ImageNet teachers" table): on 2 CPU cores
29.9 s per iteration at batch 1 (8,292 hours per Mimg) and 24.2 GB resident; the three
networks, the generator's EMA and the two Adam states are 8 x 1.18 GB in float32, so a pod or GPU node
shards them over the fsdp axis (e.g. --config.mesh_shape="(8, 4)" on 32 chips) and keeps batch 8192 as
256 per chip. No accelerator was lent to measure the device step; benchmarks/sim_step.py does on one.
"""
import ml_collections

from simjax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  c = common.image_config()
  c.data.name = "none"
  c.data.shape = (64, 64, 3)
  c.label_dim = 1000
  c.teacher.kind = "checkpoint"
  c.teacher.checkpoint = arg or ""
  # The published network's architecture (the checkpoint brings its own; benchmarks build this one).
  c.teacher.arch = ml_collections.ConfigDict(dict(preset="adm"))

  c.batch_size = 8192
  c.num_steps = 61_035                # 500 Mimg (SiD's --duration 500)
  c.optim.generator.lr = 4e-6         # Adam betas (0, 0.999) as common's, SiD's
  c.optim.fake.lr = 4e-6
  c.ema_half_life_images = 2_000_000.0  # SiD's --ema 2
  c.ema_rampup_ratio = 0.05
  c.sigma_init = 2.5
  c.loss.distance = "pseudo_huber"
  c.loss.t_max = 0.8                  # sigma in [0.002, 24.4], SiD's --tmax 800
  c.mesh_shape = (-1, 1)

  c.log_every = 20
  c.checkpoint_every = 500
  c.grid_every = 500
  c.eval.features = "inception"
  c.eval.fid_ref = ""                 # EDM's imagenet-64x64.npz
  c.eval.num_samples = 50_000
  c.eval.batch_size = 512
  c.eval.num_classes = 1000
  return c
