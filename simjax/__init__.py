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

  See `simjax.exported.Generator.sample` (class-conditional generators take `cond`).
  """
  from simjax.exported import load_generator as _load_generator  # pylint: disable=import-outside-toplevel
  return _load_generator(path)


__all__ = ["__version__", "load_generator", "load_teacher"]
