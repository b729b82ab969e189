"""Defaults shared by configs/*.py (flax examples' `default.py` habit); each config overrides what it changes.

Load it from a config with `simjax.config_files.sibling(__file__, "common")`.
"""
import ml_collections

from simjax.training import perf


def adam(lr):
  o = ml_collections.ConfigDict()
  o.lr = lr
  o.b1 = 0.0          # SiD/SIM: Adam without momentum
  o.b2 = 0.999
  o.eps = 1e-8
  o.warmup_steps = 0
  o.grad_clip = 0.0   # global-norm clipping; 0 = off
  o.grad_value_clip = 0.0  # each gradient entry into [-c, c] (SiDA clips the fake score's at 1); 0 = off
  o.forced_weight_normalization = False  # EDM2's Eq. 66 after each step (EDM2 networks only; SiD --force_normalization)
  return o


def shared_config(pipeline: str):
  """What every config has: seeds, EDM's noise constants, the teacher's guidance, the generator loss, fake-score
  and optimiser settings, the mesh, logging and checkpoints, perf and debug switches."""
  c = ml_collections.ConfigDict()
  c.pipeline = pipeline
  c.seed = 0

  c.teacher = ml_collections.ConfigDict()  # each pipeline adds its kind of teacher
  # Classifier-free guidance weight w of a conditional teacher: D_null + w (D_c - D_null); 1 = none.
  # The generator and fake score stay conditional and unguided (simjax/teachers/guidance.py); gmm: 1 only.
  c.teacher.guidance = 1.0

  c.sigma_data = 0.5
  c.sigma_min = 0.002
  c.sigma_max = 80.0
  c.rho = 7.0
  c.sigma_init = 2.5                  # generator input sigma_init * z at sigma_init (SIM/SiD); stored with the generator

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "sim"                 # the generator loss (simjax/losses/generator.py LOSSES)
  c.loss.distance = "pseudo_huber"    # or "l2"
  c.loss.normalize = True             # divide by sg(mean |x0 - D_p(x_t)|) (DMD/SiD weight)
  c.loss.normalize_floor = 1e-5
  # t ~ U[0, t_max], sigma = (s_max^(1/rho) + (1 - t)(s_min^(1/rho) - s_max^(1/rho)))^rho (SiD's direction):
  # t_max = 0.8 puts the generator loss's sigma in [0.002, 24.4], median ~1.
  c.loss.t_max = 0.8
  c.loss.t_min = 0.0
  c.loss.alpha = 1.2                  # loss.name='sid': SiD's alpha (1 is SIM-L2 up to a factor 2)
  # loss.name='dmd': DMD2's noise levels (Karras-grid indices 20..980 of 1000), sigma in [0.0032, 71.7].
  c.loss.dmd_t_min = 0.02
  c.loss.dmd_t_max = 0.98
  # DMD's regression term (off at 0; DMD uses 0.25 with LPIPS, simjax the mean squared error): the generator
  # also regresses onto its teacher's Heun samples from the same noise, `regression_pairs` of them drawn once.
  c.loss.regression_weight = 0.0
  c.loss.regression_pairs = 1024
  # loss.name='uni_instruct': the f-divergence (reverse_kl, forward_kl, jensen_shannon), its ratio q/p from the
  # discriminator below.
  c.loss.f = "reverse_kl"
  # SiD's --return_logvar for EDM2 networks: the fake score's uncertainty u(sigma) (EDM2Precond's head) weights
  # its DSM as EDM2 trains (lambda / e^u ||D - x0||^2 + dim u) and divides the generator's per-sample loss by e^u.
  c.loss.logvar_weighting = False
  # pseudo-Huber c = huber_c_per_dim * sqrt(D), data units ([-1, 1] pixels); 0.3 is the best of the digits
  # sweep (0.01, 0.1, 0.3, 1; README), carried to every image config per dimension (gmm configs set huber_c).
  c.loss.huber_c_per_dim = 0.3
  c.loss.huber_c = 0.0                # > 0: an absolute c instead (data units)
  # Loss scaling as SiD's --lsg / --ls (run_sid.sh: 100 and 1). Under Adam only eps (1e-8) sees the scale:
  # on the digits default eps is under 1% of sqrt(nu) for all but 0.03% of the generator's parameters
  # (zero-gradient ones), so 1 gives the same steps; SiD's 100 is for fp16 underflow.
  c.loss.generator_scale = 1.0
  c.loss.fake_scale = 1.0

  # SiDA's adversarial term (losses/adversarial.py): the fake score's encoder is also a discriminator of real
  # vs generated samples (trained when this is on, or for uni_instruct's ratio-weighted f), and the generator's loss
  # gains weight * its cross-entropy. 0 = off; SiDA's CIFAR-10 setting in these units is 1e-4 (--lsg_gan 0.01
  # over --lsg 100). discriminator_weight scales its loss in the fake step (SiDA's --lsd 1).
  c.adversarial = ml_collections.ConfigDict()
  c.adversarial.weight = 0.0
  c.adversarial.discriminator_weight = 1.0
  c.adversarial.start_images = 0.0    # images drawn before the term enters the generator loss (SiDA: 200k)

  # Fake score: EDM DSM on stop-gradient generator samples.
  c.fake_p_mean = -1.2
  c.fake_p_std = 1.2
  # 'auto': EDM's lognormal levels and weight, or for a discrete-time teacher (PixArt) its own training:
  # uniform trained timesteps and the epsilon loss ('lognormal' / 'grid' to choose).
  c.fake_noise = "auto"
  c.fake_steps_per_iteration = 1      # fake-score updates per generator update
  c.fake_warmup_steps = 0             # iterations with fake-score updates only
  c.fake_augment_p = 0.0              # EDM's augmentation pipe on the fake score's DSM (image configs: 0.12)

  c.batch_size = 256
  c.optim = ml_collections.ConfigDict()
  c.optim.generator = adam(1e-5)
  c.optim.fake = adam(1e-5)
  c.ema_half_life_images = 500_000.0  # 0.5 Mimg (SiD's sid_train.py --ema 0.5)
  c.ema_rampup_ratio = 0.05           # half-life <= 0.05 * images seen (SiD's training_loop default)

  c.mesh_shape = (-1, 1)              # ('data', 'fsdp'); one entry may be -1
  c.fsdp_min_size = 2**14
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.max_nonfinite_streak = 20

  c.perf = perf.default_config()      # compute dtype, remat, fused teacher/fake (simjax/training/perf.py)

  c.debug = ml_collections.ConfigDict()
  c.debug.nan_steps = ()              # tests: steps whose loss is forced to NaN
  return c


def image_config():
  """Defaults of every image config (SIM on EDM teachers; DESIGN.md section 1)."""
  c = shared_config("image")

  c.data = ml_collections.ConfigDict()
  c.data.name = ""                    # digits | cifar10 | none (no data: FID against eval.fid_ref only)
  c.data.shape = (32, 32, 3)          # (R, R, C), NHWC; a latent teacher's latent shape
  c.data.data_dir = ""                # tfds data dir (CIFAR-10)
  c.data.holdout_fraction = 0.2
  c.data.split_seed = 0
  c.label_dim = 0                     # 0 = unconditional; one-hot class labels otherwise

  c.teacher.kind = "checkpoint"       # 'checkpoint' (EDM pickle / state dict / converted dir) or 'train'
  c.teacher.checkpoint = ""
  c.teacher.arch = ml_collections.ConfigDict(dict(preset="ddpmpp"))
  # A latent teacher (EDM2's ImageNet-512): the diffusers VAE folder its latents decode with, and the teacher
  # checkpoint's latent normalisation (simjax/teachers/edm2_latents.py); '' = pixel space.
  c.vae = ""

  # Teacher training (teacher.kind == 'train'): EDM's loss, Adam with warm-up, EMA half-life in images.
  tt = c.teacher_train = ml_collections.ConfigDict()
  tt.seed = 1
  tt.num_steps = 1000
  tt.batch_size = 128
  tt.p_mean = -1.2
  tt.p_std = 1.2
  tt.label_dropout = 0.0              # class-conditional: fraction of null labels, so CFG has a D_null (e.g. 0.1)
  tt.optim = adam(1e-3)
  tt.optim.b1 = 0.9
  tt.optim.warmup_steps = 100
  tt.ema_half_life_images = 500_000.0
  tt.ema_rampup_ratio = 0.05
  tt.log_every = 100
  tt.checkpoint_every = 500

  c.fake_augment_p = 0.12             # EDM's augmentation pipe on the fake score's DSM (SiD --augment 0.12);
                                      # used where the network has augment_dim (EDM's CIFAR-10 nets: 9)
  c.num_steps = 200_000
  c.grid_every = 1000
  c.grid_size = 8

  c.eval = ml_collections.ConfigDict()
  c.eval.features = "inception"       # or 'digit_classifier'
  c.eval.inception_path = ""          # pt_inception-2015-12-05-6726825d.pth
  c.eval.fid_ref = ""                 # optional EDM fid-refs .npz (mu, sigma); else computed from data
  c.eval.num_samples = 50_000          # final evaluation
  c.eval.every = 10_000               # periodic Frechet distance every N steps (0 = off) ...
  c.eval.periodic_samples = 10_000    # ... on this many generator samples
  c.eval.batch_size = 500
  c.eval.teacher_steps = 18           # Heun: 35 network evaluations
  c.eval.num_classes = 10
  c.eval.seed = 1234
  c.eval.classifier = ml_collections.ConfigDict(dict(steps=600, seed=0, features=64))

  c.sample = ml_collections.ConfigDict()
  c.sample.source = "generator"       # or 'teacher'
  c.sample.checkpoint = ""            # default: workdir/generator or the run's teacher
  c.sample.num = 1000
  c.sample.seed = 0
  c.sample.classes = ()               # class-conditional: these classes in turn; () = uniformly drawn
  return c


def text_to_image_config():
  """Defaults of every text-to-image config: SIM on a PixArt-family teacher from prompts only."""
  c = shared_config("text_to_image")
  c.data = ml_collections.ConfigDict()
  c.data.name = ""                    # 'digits' for the embedded default; else only the shape matters
  c.data.shape = (64, 64, 4)          # what the teacher makes: PixArt-512's latents (512 / 8, 4 channels)
  c.data.holdout_fraction = 0.2
  c.data.split_seed = 0

  c.text = ml_collections.ConfigDict()
  c.text.tokenizer = "byte"           # 'byte' (ByT5's), or T5's spiece.model / a tokenizer folder / pipeline root
  c.text.encoder = ""                 # a transformers T5 folder or pipeline root; 'train' with teacher.kind='train'
  c.text.encoder_arch = ml_collections.ConfigDict(dict(  # teacher.kind='train' only
      d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
      relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"))
  c.text.max_length = 120             # PixArt-alpha's
  c.text.prompts = ""                 # .txt (a prompt per line), .jsonl (text.prompt_field) or tfds:NAME/SPLIT
  c.text.prompt_field = "text"
  c.text.data_dir = ""                # tfds data dir
  c.text.cache_dir = ""               # the prompt embeddings; default WORKDIR/embeddings
  c.text.shard_size = 1024
  c.text.encode_batch_size = 64
  c.text.cache_dtype = "float16"
  # 0: every cached prompt is in the generator's pool (on the devices); > 0: windows of this many shards
  # streamed from the cache, the next every text.pool_every steps (a function of the step: resume replays).
  c.text.pool_shards = 0
  c.text.pool_every = 1000

  c.teacher.kind = "checkpoint"       # a PixArt/DiT folder or file, or 'train' (the digits default)
  c.teacher.checkpoint = ""
  c.teacher.runtime = ml_collections.ConfigDict(dict(scan_blocks=False, remat=False, attention_implementation=""))
  c.teacher.arch = ml_collections.ConfigDict(dict(patch_size=2, num_heads=4, head_dim=16, depth=4))  # 'train' only
  c.teacher.schedule = ml_collections.ConfigDict(dict(  # 'train' only; a checkpoint brings its own
      num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"))
  # Classifier-free guidance of the teacher, D_null + w (D_c - D_null) (PixArt's sampler default 4.5); the
  # generator and the fake score stay unguided.
  c.teacher.guidance = 4.5
  c.teacher.null = "checkpoint"       # the null caption: the checkpoint's (PixArt's learned one) or 'empty_prompt'
  c.vae = ""                          # a latent teacher's VAE (diffusers AutoencoderKL): grids and samples decoded

  tt = c.teacher_train = ml_collections.ConfigDict()  # teacher.kind='train': epsilon loss, T5 trained with it
  tt.seed = 1
  tt.num_steps = 4000
  tt.batch_size = 128
  tt.caption_dropout = 0.1            # rows given the null caption, so guidance has a D_null
  # > 0: the trained encoder also learns to name the digit a caption spells (cross-entropy of a linear head on
  # its mean-pooled output, weighted so), the small encoder's stand-in for what a pretrained T5 knows of words.
  tt.caption_digit_weight = 0.0
  tt.optim = adam(1e-3)
  tt.optim.b1 = 0.9
  tt.optim.warmup_steps = 200
  tt.ema_half_life_images = 50_000.0
  tt.ema_rampup_ratio = 0.05
  tt.log_every = 200
  tt.checkpoint_every = 1000

  # digits only; distractors: the fraction of training captions given made-up words, word_fraction: the
  # fraction that spell the digit out (digit_captions.py)
  c.captions = ml_collections.ConfigDict(dict(per_image=8, eval_per_image=1, seed=0, distractors=0.0,
                                              word_fraction=0.5))

  c.num_steps = 10_000
  c.grid_every = 1000
  c.grid_size = 4

  c.eval = ml_collections.ConfigDict()
  c.eval.features = "none"            # 'digit_classifier' on digits
  c.eval.samples_per_prompt = 4
  c.eval.batch_size = 256
  c.eval.teacher_steps = 18           # Heun on the trained levels: 35 NFE (x2 with guidance)
  c.eval.guidance_sweep = (1.0, 2.0, 4.5)
  c.eval.seed = 1234
  c.eval.every = 0
  c.eval.fid_ref = ""
  c.eval.classifier = ml_collections.ConfigDict(dict(steps=600, seed=0, features=64))

  c.sample = ml_collections.ConfigDict()
  c.sample.source = "generator"       # or 'teacher' (its guided sampler)
  c.sample.checkpoint = ""            # default: WORKDIR/generator
  c.sample.prompts = ""               # --mode=sample: a .txt / .jsonl file of prompts
  c.sample.per_prompt = 1
  c.sample.seed = 0
  return c
