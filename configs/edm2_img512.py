"""SIM on class-conditional ImageNet 512x512 from an EDM2 teacher, in the Stable Diffusion VAE's latent space
(EDM2's published pickles, XS to XXL: the size comes from the pickle), with SiD's EDM2 settings.

  python -m simjax.main --config=configs/edm2_img512.py:/path/to/edm2-img512-xs-2147483-0.135.pkl \
      --workdir=gs://bucket/sim-edm2-xs \
      --config.vae=/path/to/sd-vae-ft-mse \
      --config.eval.inception_path=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --config.eval.fid_ref=/path/to/img512.pkl              # EDM2's dataset-refs statistics

--config.vae is a diffusers folder of stabilityai/sd-vae-ft-mse. The generator, fake score and teacher are
EDM2 networks on 64x64x4 latents; the latent normalisation comes from the pickle's StabilityVAEEncoder
record, and samples are decoded (VAE, 512x512) only for FID and grids.
A training snapshot (network-snapshot-*.pkl) or a post-hoc EMA reconstruction loads the same way, as does
a `python -m simjax.convert_edm` directory of either. SiD's run_sid_edm2.sh (SiDA branch) for every size:
batch 2048, Adam lr 5e-5 for both networks, betas (0, 0.999), tmax 800, init_sigma 2.5, EMA half-life 2 Mimg,
forced weight normalisation of the trained networks (EDM2's, --force_normalization 1), duration 200 Mimg
(100 for XXL), i.e. 97,657 steps at batch 2048, and --return_logvar 1 (loss.logvar_weighting): the fake
score's EDM2 uncertainty u(sigma) weights its DSM as EDM2 trains and divides the generator loss by e^u.

What it takes (benchmarks/sim_step.py --config=configs/edm2_img512.py --batch=1 --iteration_only --repeats=3; the README's
"ImageNet teachers" table): for XS (125M parameters) on 2 CPU cores 14.6 s per iteration at batch 1
(4,045 hours per Mimg), 11.8 GB resident; three networks, the generator's EMA and two Adam states are
8 x 0.5 GB (XS) to 8 x 6 GB (XXL, 1.5B) in float32: shard them over the fsdp axis of a pod slice or GPU node
(--config.mesh_shape="(D, F)"). No accelerator was lent to measure the device step.
"""
import ml_collections

from simjax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  c = common.image_config()
  c.data.name = "none"
  c.data.shape = (64, 64, 4)          # 512 x 512 through the VAE's 8x downsampling
  c.label_dim = 1000
  c.teacher.kind = "checkpoint"
  c.teacher.checkpoint = arg or ""
  c.teacher.arch = ml_collections.ConfigDict(dict(preset="edm2-xs"))  # benchmarks only; the pickle brings its own
  c.vae = ""

  c.batch_size = 2048
  c.num_steps = 97_657                # 200 Mimg (SiD's --duration 200)
  c.optim.generator.lr = 5e-5
  c.optim.fake.lr = 5e-5
  c.optim.generator.forced_weight_normalization = True  # EDM2's Eq. 66, SiD's --force_normalization 1
  c.optim.fake.forced_weight_normalization = True
  c.ema_half_life_images = 2_000_000.0  # SiD's --ema 2
  c.ema_rampup_ratio = 0.05
  c.sigma_init = 2.5
  c.loss.distance = "pseudo_huber"
  c.loss.t_max = 0.8                  # sigma in [0.002, 24.4]
  c.loss.logvar_weighting = True      # SiD's --return_logvar 1
  c.fake_p_mean = -0.4                # EDM2's img512 training distribution of noise levels (P_mean, P_std)
  c.fake_p_std = 1.0

  c.log_every = 20
  c.checkpoint_every = 500
  c.grid_every = 500
  c.grid_size = 4
  c.eval.features = "inception"
  c.eval.num_samples = 50_000
  c.eval.batch_size = 32              # global; each image is decoded at 512x512 (the VAE decoder) for FID
  c.eval.num_classes = 1000
  return c
