"""Teachers from EDM checkpoints: conversion of EDM state dicts to simjax parameters, and loading.

Accepted sources (all read without executing code from the file, see `simjax.torch_files`):
- an EDM network pickle (`network-snapshot-*.pkl`): architecture from its recorded init_kwargs;
- a state dict (`.pt`/`.pth` torch.save, or `.npz`): architecture from `arch=` (dict or JSON path), an
  adjacent `arch.json`, or an `.npz`'s own `config_json` entry (simjax's fixtures);
- a converted checkpoint directory: `arch.json` (the arch dict) + `params/` (orbax), written by
  `save_converted` or `python -m simjax.convert_edm`.

Conversion is a rename and a transpose (DESIGN.md section 3): flax path model/enc/8x8_block0/conv0/
kernel <- torch `model.enc.8x8_block0.conv0.weight` (OIHW -> HWIO; Linear [out, in] -> [in, out];
GroupNorm weight -> scale). Buffers are checked, not stored: `resample_filter` must equal the filter
the arch implies; NCSN++'s `map_noise.freqs` becomes the arch entry `fourier_freqs`.
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from simjax import storage, torch_files, weight_files
from simjax.networks.precond import build_precond, param_shapes
from simjax.networks.songunet import resample_kernel_2d
from simjax.teachers import edm2_latents

ARCH_FILE = "arch.json"
PARAMS_DIR = "params"
_FREQS_NAME = "model.map_noise.freqs"
_STATE_SUFFIXES = (".pt", ".pth", ".npz")
_PICKLE_SUFFIXES = (".pkl", ".pickle")


def _plain_arch(arch: Mapping[str, Any]) -> Dict[str, Any]:
  """A JSON-friendly copy of an arch dict (tuples -> lists, numpy scalars -> python)."""
  def plain(v):
    if isinstance(v, Mapping):
      return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    if isinstance(v, np.generic):
      return v.item()
    return v
  return plain(dict(arch))


def _torch_shape(name: str, flax_shape) -> Tuple[int, ...]:
  return weight_files.torch_kernel_shape(flax_shape) if name.endswith("kernel") else tuple(flax_shape)


def _to_flax(leaf_name: str, tensor: np.ndarray) -> np.ndarray:
  return weight_files.kernel_from_torch(tensor) if leaf_name == "kernel" else tensor


def _summarise(names, limit=4):
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


# flax leaf name -> torch's; other leaves (EDM2's scalar gains emb_gain, out_gain) keep their names.
_TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _arch_buffers(module) -> Dict[str, str]:
  """torch buffer name -> arch key, for the fixed random buffers a network keeps in its arch dict."""
  if getattr(module.model, "embedding_type", None) == "fourier":
    return {_FREQS_NAME: "fourier_freqs"}  # NCSN++'s Fourier frequencies
  return dict(getattr(type(module), "ARCH_BUFFERS", {}))  # a preconditioner's own (EDM2's)


def convert_state_dict(arch: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Tuple[Dict[str, Any], dict]:
  """EDM state dict (torch names, numpy arrays) -> (arch, variables {'params': ...}) for build_precond.

  Raises a one-line ValueError on missing, misshapen or unexpected tensors. The returned arch is
  JSON-friendly and holds the checkpoint's fixed random buffers: NCSN++'s `fourier_freqs`, EDM2's
  `emb_fourier_*` / `logvar_fourier_*` frequencies and phases.
  """
  arch = _plain_arch(arch)
  state = {str(k): np.asarray(v) for k, v in state.items()}
  used = set()
  module = build_precond(arch)
  buffers = _arch_buffers(module)
  if buffers:
    absent = [name for name in buffers if name not in state]
    if absent:
      raise ValueError(f"state dict is missing {_summarise(absent)} (the network's fixed random Fourier buffers); "
                       "convert a complete state dict.")
    for name, key in buffers.items():
      arch[key] = [float(v) for v in state[name].astype(np.float32).reshape(-1)]
      used.add(name)
    module = build_precond(arch)  # the number of frequencies is checked when param_shapes traces it

  expected = flax.traverse_util.flatten_dict(param_shapes(module)["params"])
  params, missing, misshapen = {}, [], []
  for path, leaf in expected.items():
    torch_name = ".".join(path[:-1] + (_TORCH_LEAF_NAMES.get(path[-1], path[-1]),))
    if torch_name not in state:
      missing.append(torch_name)
      continue
    value = _to_flax(path[-1], state[torch_name])
    if tuple(value.shape) != tuple(leaf.shape):
      misshapen.append(f"{torch_name} {tuple(state[torch_name].shape)} != {_torch_shape(path[-1], leaf.shape)}")
      continue
    params[path] = np.asarray(value, np.float32)
    used.add(torch_name)
  if missing:
    raise ValueError(f"state dict does not match the architecture: missing {len(missing)} tensors ({_summarise(missing)}); "
                     "check the arch (channels, blocks, attention, label/augment dims).")
  if misshapen:
    raise ValueError(f"state dict does not match the architecture: {len(misshapen)} misshapen tensors "
                     f"({_summarise(misshapen, 2)}); check the arch kwargs.")

  filter_2d = resample_kernel_2d(getattr(module.model, "resample_filter", (1, 1)))
  unexpected = []
  for name in sorted(set(state) - used):
    if name.endswith(".resample_filter"):
      buffer = state[name].astype(np.float32)
      if buffer.size != filter_2d.size or not np.allclose(buffer.reshape(filter_2d.shape), filter_2d, atol=1e-6):
        raise ValueError(f"buffer {name} does not match resample_filter={list(module.model.resample_filter)} "
                         "in the arch; fix the arch's resample_filter.")
    else:
      unexpected.append(name)
  if unexpected:
    raise ValueError(f"state dict has {len(unexpected)} tensors the architecture does not use ({_summarise(unexpected)}); "
                     "check the arch (label_dim, augment_dim, encoder/decoder type).")
  return arch, {"params": flax.traverse_util.unflatten_dict(params)}


# ----------------------------------------------------------------------------------------------
# Converted checkpoint directories.


def check_output_dir(out_dir) -> None:
  """A converted checkpoint's OUT_DIR must be absent or an empty directory (nothing of the user's is replaced)."""
  out_dir = Path(out_dir)
  if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
    what = "is a file" if not out_dir.is_dir() else "already exists and is not empty"
    raise ValueError(f"output directory {out_dir} {what}; remove it or choose another path.")


def save_converted(out_dir, arch: Mapping[str, Any], params, *, latents=None) -> Path:
  """Writes OUT_DIR/arch.json + OUT_DIR/params (orbax) atomically; OUT_DIR must be absent or empty.

  `params` is the variables pytree ({'params': ...}) that `module.apply` takes; `latents` an EDM2 latent
  normalisation (simjax.teachers.edm2_latents), written as latents.json.
  """
  out_dir = Path(out_dir).absolute()
  check_output_dir(out_dir)
  with storage.staged_directory(out_dir) as staging:
    write_converted(staging, arch, params)
    edm2_latents.write_latent_normalization(staging, latents)
  return out_dir


def write_converted(directory, arch: Mapping[str, Any], params):
  """arch.json + params/ into an existing, empty (staging) directory; see `save_converted`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = epath.Path(directory)
  if not storage.is_remote(directory):
    directory = directory.absolute()  # orbax refuses relative paths
  (directory / ARCH_FILE).write_text(json.dumps(_plain_arch(arch), indent=1, sort_keys=True) + "\n")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, jax.tree_util.tree_map(np.asarray, params))
  checkpointer.wait_until_finished()
  checkpointer.close()


def read_arch_file(path) -> Dict[str, Any]:
  path = Path(path)
  try:
    arch = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read architecture file {path} ({e}); it must be a JSON object of EDM kwargs.") from None
  if not isinstance(arch, dict):
    raise ValueError(f"architecture file {path} must hold a JSON object of EDM kwargs.")
  return arch


def load_converted(ckpt_dir, *, dtype=jnp.float32, precision=None) -> Tuple[Dict[str, Any], dict]:
  """(arch, variables) from a directory written by `save_converted`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  ckpt_dir = Path(ckpt_dir).absolute()
  if not (ckpt_dir / ARCH_FILE).is_file() or not (ckpt_dir / PARAMS_DIR).is_dir():
    raise ValueError(f"{ckpt_dir} is not a converted EDM checkpoint (needs {ARCH_FILE} and {PARAMS_DIR}/); "
                     "create one with `python -m simjax.convert_edm IN.pkl OUT_DIR`.")
  arch = read_arch_file(ckpt_dir / ARCH_FILE)
  abstract = param_shapes(build_precond(arch, dtype=dtype, precision=precision))
  checkpointer = ocp.StandardCheckpointer()
  try:
    variables = checkpointer.restore(ckpt_dir / PARAMS_DIR, abstract)
  finally:
    checkpointer.close()
  return arch, jax.tree_util.tree_map(jnp.asarray, variables)


# ----------------------------------------------------------------------------------------------
# Reading any supported source.


def _arch_for_state_file(path: Path, arch) -> Dict[str, Any]:
  if isinstance(arch, Mapping):
    return dict(arch)
  if arch is not None:
    return read_arch_file(arch)
  if (path.parent / ARCH_FILE).is_file():
    return read_arch_file(path.parent / ARCH_FILE)
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      for key in ("config_json", "arch_json"):
        if key in data.files:
          return json.loads(str(data[key]))
  raise ValueError(f"{path} is a bare state dict: pass arch={{...}} (EDM precond kwargs) or put {ARCH_FILE} beside it.")


def read_edm_checkpoint(path, *, arch: Union[None, Mapping[str, Any], str, os.PathLike] = None, state=None
                        ) -> Tuple[Dict[str, Any], dict]:
  """(arch, variables) from an EDM pickle, a state-dict file or a converted directory (`state`: the
  state-dict file's tensors when the caller has read them already)."""
  arch, variables, _ = read_edm_source(path, arch=arch, state=state)
  return arch, variables


def read_edm_source(path, *, arch: Union[None, Mapping[str, Any], str, os.PathLike] = None, state=None
                    ) -> Tuple[Dict[str, Any], dict, Optional[edm2_latents.LatentNormalization]]:
  """(arch, variables, latent normalisation or None) from one read of the file: EDM2's latent networks carry
  their normalisation in the pickle (its encoder record) or, converted, in latents.json."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such file or directory: {path}")
  if path.is_dir():
    return load_converted(path) + (edm2_latents.read_latent_normalization(path),)
  if path.suffix in _STATE_SUFFIXES:
    return convert_state_dict(_arch_for_state_file(path, arch),
                              torch_files.load_state_dict(path) if state is None else state) + (None,)
  if path.suffix in _PICKLE_SUFFIXES or arch is None:
    pickle_arch, state, encoder = torch_files.read_edm_network_pickle(path)
    return convert_state_dict(dict(arch) if isinstance(arch, Mapping) else pickle_arch, state) + (
        edm2_latents.from_encoder_record(encoder),)
  raise ValueError(f"{path}: unknown checkpoint type; use an EDM .pkl, a .pt/.pth/.npz state dict or a converted directory.")


@dataclasses.dataclass
class Teacher:
  """A frozen pretrained denoiser: `module.apply(params, x, sigma, ...)` = D(x, sigma) (NHWC, float32)."""
  module: Any
  params: Any
  arch: Dict[str, Any]
  # The null condition as the checkpoint provides it (one row, no batch axis; e.g. PixArt's learned
  # empty caption); None: zeros (simjax.conditioning.null_like).
  null_cond: Any = None
  # EDM2's latent normalisation (simjax.teachers.edm2_latents) for a latent-space network, else None.
  latents: Any = None
  _denoise_fn: Callable = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    module = self.module

    def denoise_fn(variables, x, sigma, cond, augment_labels):
      return module.apply(variables, x, sigma, cond, augment_labels, train=False)

    self._denoise_fn = jax.jit(denoise_fn)

  @property
  def label_dim(self) -> int:
    return self.module.label_dim

  @property
  def img_resolution(self) -> int:
    return self.module.img_resolution

  @property
  def img_channels(self) -> int:
    return self.module.img_channels

  def denoise(self, x, sigma, cond=None, augment_labels=None, *, class_labels=None):
    """D(x, sigma) for NHWC float32 x [N, R, R, C], sigma scalar or [N], cond one-hot class labels
    [N, label_dim], a text condition {'emb', 'mask'} or None (`class_labels=`, EDM's name, is the
    same argument)."""
    if class_labels is not None:
      if cond is not None:
        raise ValueError("pass the class labels once, as cond or as class_labels.")
      cond = class_labels
    return self._denoise_fn(self.params, jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32),
                            jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), cond),
                            None if augment_labels is None else jnp.asarray(augment_labels, jnp.float32))


def load_teacher(path, *, arch=None, dtype=jnp.float32, precision=None) -> Teacher:
  """A `Teacher` from an EDM pickle, a state dict (+ arch) or a converted checkpoint directory.

  dtype: the network's compute dtype (parameters stay float32, D is float32).
  precision: of the network's convolutions and matmuls; None is XLA's default (TF32 for float32 on
    recent NVIDIA GPUs, ~5e-4 from EDM's float32 output), jax.lax.Precision.HIGHEST for exact float32.
  """
  arch, variables, latents = read_edm_source(path, arch=arch)
  return teacher_from_variables(arch, variables, dtype=dtype, precision=precision, latents=latents)


def teacher_from_variables(arch, variables, *, dtype=jnp.float32, precision=None, latents=None) -> Teacher:
  """The Teacher of an EDM arch dict and its converted variables."""
  module = build_precond(arch, dtype=dtype, precision=precision)
  return Teacher(module=module, params=jax.tree_util.tree_map(jnp.asarray, variables), arch=arch, latents=latents)


__all__ = ["Teacher", "load_teacher", "teacher_from_variables", "convert_state_dict", "save_converted", "load_converted",
           "read_edm_checkpoint", "read_edm_source", "read_arch_file"]
