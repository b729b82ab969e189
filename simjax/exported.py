"""The exported one-step generator of an image or text-to-image run, for sampling from Python
(`simjax.load_generator`).

A run writes WORKDIR/generator/: arch.json, params/ (the EMA generator: an EDM network, or a converted
transformer) and generator.json (sigma_init, the step, `latent` for a latent teacher's run; for
text-to-image runs `text`: the condition's shape and the tokenizer and T5 encoder that make it). `load_generator` reads it back; `Generator.sample`
draws images in the data's layout and range, the same images `--mode=sample` writes for the same seed
and batch size; a text generator takes `prompts=` (encoded with its own tokenizer and encoder) or `cond=`.
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
  text: Optional[dict] = None  # text-to-image: {'length', 'dim', 'tokenizer', 'encoder', 'max_length'}
  latent: bool = False  # samples are a latent teacher's latents: returned as they are, not clipped to [-1, 1]
  _samplers: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # compiled once per batch

  @property
  def data_shape(self):
    return self.nets.data_shape

  @property
  def label_dim(self) -> int:
    return self.nets.label_dim

  def encode_prompts(self, prompts):
    """prompts -> the text condition {'emb', 'mask'} this generator reads (its run's tokenizer and encoder)."""
    if self.text is None:
      raise UserError("this generator is not text-conditioned; call sample() without prompts.")
    if "encoder" not in self._samplers:
      from simjax.text.t5_checkpoints import load_text_encoder  # pylint: disable=import-outside-toplevel
      from simjax.text.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel
      try:
        self._samplers["encoder"] = (load_tokenizer(self.text["tokenizer"]), load_text_encoder(self.text["encoder"]))
      except FileNotFoundError as e:
        raise UserError(f"the text encoder this generator was trained with is not at {self.text['encoder']} "
                        f"({e}); pass cond= with embeddings of your own.") from None
    tokenizer, encoder = self._samplers["encoder"]
    ids, mask = tokenizer(list(prompts), int(self.text["max_length"]))
    return {"emb": np.asarray(encoder.encode(ids, mask), np.float32), "mask": np.asarray(mask, np.float32)}

  def sample(self, num: int, seed: int = 0, cond=None, *, prompts=None, batch_size: Optional[int] = None,
             return_labels: bool = False, mesh=None, describe: str = ""):
    """`num` images [num, H, W, C], float32 in [-1, 1] (clipped; a latent generator's latents unclipped),
    deterministic in (seed, batch_size).

    cond: None (conditions drawn: uniform random classes when class-conditional), integer classes
    [num], one-hot [num, label_dim], or a text condition {'emb', 'mask'} of num rows (simjax.conditioning). The latents depend on the seed only, so one seed with other classes changes only
    the class. Runs over every local device; batch_size (default 256, rounded up to the device
    count) must match `--config.eval.batch_size` to reproduce `--mode=sample` exactly. The mesh (default:
    every device, data-parallel) changes the work split, never the samples. prompts: `num` strings
    for a text-conditioned generator (in place of cond).
    """
    if prompts is not None:
      if cond is not None or len(prompts) != int(num):
        raise UserError(f"pass {num} prompts, or cond, not both; got {len(prompts)} prompts.")
      cond = self.encode_prompts(prompts)
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
    x = out.x if self.latent else np.clip(out.x, -1.0, 1.0)
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
  from simjax.teachers import loading  # pylint: disable=import-outside-toplevel
  folder = find_export(path)
  info = json.loads((folder / INFO_FILE).read_text())
  network = loading.load_teacher(str(folder))
  params, extra = split_variables(network.params)
  text = info.get("text")
  space = (CondSpace(text_length=int(text["length"]), text_dim=int(text["dim"])) if text else
           CondSpace(label_dim=int(network.label_dim)))
  nets = DistillNetworks(generator=Denoiser(network.module), fake=None, teacher=None,
                         data_shape=(network.img_resolution, network.img_resolution, network.img_channels),
                         cond_space=space, sigma_init=float(info["sigma_init"]))
  return Generator(nets=nets, params=jax.device_get(params), extra=extra, step=int(info.get("step", 0)),
                   path=str(folder), text=text, latent=bool(info.get("latent", False)))
