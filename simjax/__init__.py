"""simjax: Score Implicit Matching distillation of diffusion models, in JAX/Flax.

Importing simjax has no side effects; heavy submodules load on first use.
"""

__version__ = "0.1.0"


def load_teacher(path, **kwargs):
  """Loads a teacher denoiser: EDM (pickle, state dict, converted checkpoint) or PixArt-alpha / DiT
  (diffusers pipeline or transformer folder, original .pth/.pt).

  See `simjax.teachers.loading.load_teacher`.
  """
  from simjax.teachers.loading import load_teacher as _load_teacher  # pylint: disable=import-outside-toplevel
  return _load_teacher(path, **kwargs)


def load_generator(path):
  """The one-step generator an image run exported: `path` is the run's workdir or its generator/ folder.

    gen = simjax.load_generator("workdirs/digits")
    x = gen.sample(64, seed=0)          # [64, 8, 8, 1] float32 in [-1, 1]

  A text-to-image run's generator takes prompts (encoded with the run's tokenizer and T5):

    gen = simjax.load_generator("workdirs/digits_t2i")
    x = gen.sample(2, seed=0, prompts=["a thick 7", "the digit three"])

  See `simjax.exported.Generator.sample` (class-conditional generators take `cond`).
  """
  from simjax.exported import load_generator as _load_generator  # pylint: disable=import-outside-toplevel
  return _load_generator(path)


def load_vae(path, **kwargs):
  """The Stable Diffusion VAE of a diffusers folder (or a pipeline's `vae/`): `encode(images)` /
  `decode(latents)` on NHWC images in [-1, 1], latents scaled as the diffusion model saw them.

  See `simjax.teachers.vae_checkpoints.load_vae`.
  """
  from simjax.teachers.vae_checkpoints import load_vae as _load_vae  # pylint: disable=import-outside-toplevel
  return _load_vae(path, **kwargs)


def load_text_encoder(path, **kwargs):
  """The T5 encoder of a transformers folder (or a pipeline's `text_encoder/`):
  `encode(token_ids, mask) -> [N, L, D]`.

  See `simjax.text.t5_checkpoints.load_text_encoder`.
  """
  from simjax.text.t5_checkpoints import load_text_encoder as _load  # pylint: disable=import-outside-toplevel
  return _load(path, **kwargs)


def load_tokenizer(path):
  """T5's sentencepiece tokenizer (a `spiece.model`, a `tokenizer/` folder or a pipeline root), or 'byte'
  for the byte-level one: `tokenizer(texts, max_length) -> (ids, mask)`.

  See `simjax.text.tokenizers.load_tokenizer`.
  """
  from simjax.text.tokenizers import load_tokenizer as _load  # pylint: disable=import-outside-toplevel
  return _load(path)


__all__ = ["__version__", "load_generator", "load_teacher", "load_text_encoder", "load_tokenizer", "load_vae"]
