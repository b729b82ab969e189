"""The exported one-step generator of an image run, for sampling from Python (`simjax.load_generator`).

An image run writes WORKDIR/generator/: arch.json, params/ (the EMA generator) and generator.json
(sigma_init, the step). `load_generator` reads it back; `Generator.sample` draws images in the data's
layout and range, the same images `--mode=sample` writes for the same seed and batch size.
"""
import dataclasses
import json
from typing import Optional

import jax
import numpy as np
from etils import epath

from simjax import conditioning, sampling
from simjax.conditioning import CondSpace
from simjax.errors import UserError
from simjax.parallel import mesh as mesh_lib
from simjax.training import distill
from simjax.training.roles import Denoiser, DistillNetworks, split_variables

INFO_FILE = "generator.json"
DEFAULT_BATCH = 256


def find_export(path) -> epath.Path:
  """The generator/ folder named by `path`: that folder, or the workdir holding it."""
  path = epath.Path(path)
  for candidate in (path, path / "generator"):
    if (candidate / "arch.json").exists() and (candidate / INFO_FILE).exists():
      return candidate
  raise UserError(f"no exported generator at {path} (needs arch.json and {INFO_FILE}); pass a finished image "
                  "run's workdir or its generator/ folder.")


@dataclasses.dataclass(frozen=True)
class Generator:
  """A one-step generator x = G(sigma_init z, sigma_init, labels) with its parameters."""
  nets: DistillNetworks
  params: object
  extra: dict
  step: int
  path: str
  _samplers: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # compiled once per batch

  @property
  def data_shape(self):
    return self.nets.data_shape

  @property
  def label_dim(self) -> int:
    return self.nets.label_dim

  def sample(self, num: int, seed: int = 0, cond=None, *, batch_size: Optional[int] = None,
             return_labels: bool = False, mesh=None, describe: str = ""):
    """`num` images [num, H, W, C], float32 in [-1, 1] (clipped), deterministic in (seed, batch_size).

    cond: None (conditions drawn: uniform random classes when class-conditional), integer classes
    [num], one-hot [num, label_dim], or a text condition {'emb', 'mask'} of num rows (simjax.conditioning). The latents depend on the seed only, so one seed with other classes changes only
    the class. Runs over every local device; batch_size (default 256, rounded up to the device
    count) must match `--config.eval.batch_size` to reproduce `--mode=sample` exactly. The mesh (default:
    every device, data-parallel) changes the work split, never the samples.
    """
    mesh = mesh if mesh is not None else mesh_lib.make_mesh((-1, 1))
    shards = mesh_lib.num_batch_shards(mesh)
    batch = int(batch_size or min(DEFAULT_BATCH, -(-int(num) // shards) * shards))
    cond = _as_cond(cond, int(num), self.nets.cond_space)
    key = (batch, mesh)
    if key not in self._samplers:
      self._samplers[key] = (distill.make_generator_sampler(self.nets, self.extra, batch, mesh),
                             sampling.replicate(self.params, mesh))
    sampler, params = self._samplers[key]
    out = sampler(params, int(num), int(seed), describe, cond=cond)
    x = np.clip(out.x, -1.0, 1.0)
    return (x, out.cond) if return_labels else x


def _as_cond(cond, num: int, space: CondSpace):
  """`cond` as the generator's conditions: integer classes become one-hot; anything else is checked."""
  if cond is None:
    return None
  if space.kind == "none":
    raise UserError("this generator is unconditional; call sample() without cond.")
  if isinstance(cond, dict):
    space.check(cond, num)
    return conditioning.as_arrays(cond)
  cond = np.asarray(cond)
  label_dim = space.label_dim
  if cond.ndim == 1:
    if cond.shape[0] != num or not np.issubdtype(cond.dtype, np.integer) or cond.min() < 0 or cond.max() >= label_dim:
      raise UserError(f"cond must be {num} integer classes in [0, {label_dim}) or one-hot [{num}, {label_dim}]; "
                      f"got shape {cond.shape}, dtype {cond.dtype}.")
    return np.eye(label_dim, dtype=np.float32)[cond]
  return cond.astype(np.float32)


def load_generator(path) -> Generator:
  """The generator exported by an image run: `path` is its workdir or the workdir's generator/ folder."""
  from simjax.teachers import edm_checkpoints  # pylint: disable=import-outside-toplevel
  folder = find_export(path)
  info = json.loads((folder / INFO_FILE).read_text())
  network = edm_checkpoints.load_teacher(str(folder))
  params, extra = split_variables(network.params)
  nets = DistillNetworks(generator=Denoiser(network.module), fake=None, teacher=None,
                         data_shape=(network.img_resolution, network.img_resolution, network.img_channels),
                         cond_space=CondSpace(label_dim=int(network.label_dim)), sigma_init=float(info["sigma_init"]))
  return Generator(nets=nets, params=jax.device_get(params), extra=extra, step=int(info.get("step", 0)),
                   path=str(folder))
