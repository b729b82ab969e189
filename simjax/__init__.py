"""simjax: Score Implicit Matching distillation of diffusion models, in JAX/Flax.

Importing simjax has no side effects; heavy submodules load on first use.
"""

__version__ = "0.1.0"


def load_teacher(path, **kwargs):
  """Loads a teacher denoiser from an EDM pickle, a state dict or a converted checkpoint.

  See `simjax.teachers.edm.load_teacher`.
  """
  from simjax.teachers.edm import load_teacher as _load_teacher  # pylint: disable=import-outside-toplevel
  return _load_teacher(path, **kwargs)


__all__ = ["__version__", "load_teacher"]
