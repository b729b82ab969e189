"""diffusers AutoencoderKL checkpoints -> simjax's Flax VAE (`simjax.networks.vae`), without torch.

Reads a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`, or the `.bin`
state dict through simjax.torch_files, which runs no code from the file) or a pipeline root holding one
under `vae/`. Both attention namings of the mid-blocks load: today's `to_q / to_k / to_v / to_out.0`
and the `query / key / value / proj_attn` of checkpoints saved before diffusers 0.14 (original SD
repositories still ship them), including their 1x1-conv-shaped [C, C, 1, 1] projection weights. A
missing, unexpected or misshapen tensor is a CheckpointMismatch naming it.

`load_vae` returns a `VAE`: jitted `encode` (images -> scaled latents, the space the diffusion model
was trained in) and `decode` (the inverse), so callers never handle scaling_factor by hand.
"""
import dataclasses
import functools
import json
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from simjax import draws
from simjax import weight_files
from simjax.networks.vae import AutoencoderKL
from simjax.weight_files import CheckpointMismatch

VAE_CLASSES = ("AutoencoderKL",)
# diffusers' AutoencoderKL defaults, which a config.json relies on for the keys it omits.
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
                          latent_channels=4, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
                          mid_block_add_attention=True)
DEFAULT_SCALING_FACTOR = 0.18215  # diffusers' default, Stable Diffusion 1.x/2.x's
# Pre-0.14 diffusers attention names -> today's (diffusers' own _convert_deprecated_attention_blocks).
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_KEY = re.compile(r"(.+\.attentions\.\d+)\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(weight|bias)")


def arch_from_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  """AutoencoderKL kwargs from a diffusers VAE `config.json` (absent keys take diffusers' defaults)."""
  name = config.get("_class_name", "AutoencoderKL")
  if name not in VAE_CLASSES:
    raise ValueError(f"{name} is not a KL autoencoder; simjax reads {VAE_CLASSES} (the Stable Diffusion VAE).")
  if config.get("act_fn", "silu") != "silu":
    raise ValueError(f"act_fn={config['act_fn']!r} is not supported; the Stable Diffusion VAE uses 'silu'.")
  arch = {key: config.get(key, default) for key, default in DIFFUSERS_DEFAULTS.items()}
  for key in ("down_block_types", "up_block_types", "block_out_channels"):
    arch[key] = tuple(arch[key])  # hashable module fields
  arch["block_out_channels"] = tuple(int(w) for w in arch["block_out_channels"])
  for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
    arch[key] = int(arch[key])
  for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
    arch[key] = bool(arch[key])
  AutoencoderKL(**arch).check_arch()
  return arch


def latent_scaling(config: Mapping[str, Any]) -> Tuple[float, float]:
  """(scaling_factor, shift_factor) of latents = scaling_factor * (z - shift_factor); shift 0 if absent."""
  if config.get("latents_mean") is not None or config.get("latents_std") is not None:
    raise ValueError("this VAE normalises latents per channel (latents_mean / latents_std), which its pipeline "
                     "applies; simjax reads only scaling_factor / shift_factor VAEs.")
  scaling = config.get("scaling_factor")
  shift = config.get("shift_factor")
  return float(DEFAULT_SCALING_FACTOR if scaling is None else scaling), float(shift or 0.0)


def _current_attention_names(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Old attention names renamed, and 1x1-conv-shaped [C, C, 1, 1] projections squeezed to [C, C]."""
  out: Dict[str, np.ndarray] = {}
  for key, value in state.items():
    m = _ATTENTION_KEY.fullmatch(key)
    if m:
      prefix, projection, suffix = m.groups()
      key = f"{prefix}.{_OLD_ATTENTION_NAMES.get(projection, projection)}.{suffix}"
      if suffix == "weight" and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    if key in out:
      raise CheckpointMismatch(f"{key} appears under both attention namings; keep one of them.")
    out[key] = value
  return out


def _to_flax_leaf(path: Tuple[str, ...], value: np.ndarray) -> Tuple[Tuple[str, ...], np.ndarray]:
  """torch layouts -> flax: conv OIHW -> HWIO, linear [out, in] -> [in, out], GroupNorm weight -> scale."""
  if path[-1] != "weight":
    return path, value
  if value.ndim in (2, 4):
    return path[:-1] + ("kernel",), weight_files.kernel_from_torch(value)
  return path[:-1] + ("scale",), value


def _torch_name(path: Tuple[str, ...]) -> str:
  """A flax parameter path as the diffusers tensor it is read from: ('to_out_0', 'kernel') -> 'to_out.0.weight'."""
  parts = [re.sub(r"_(\d+)$", r".\1", part) for part in path[:-1]]
  return ".".join(parts + ["weight" if path[-1] in ("kernel", "scale") else path[-1]])


def convert_state_dict(arch: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> dict:
  """Flax `{'params': ...}` (float32) for AutoencoderKL(**arch) from a diffusers-named state dict.
  Errors name tensors as diffusers does (today's attention names), shapes in torch's layout."""
  state = _current_attention_names({k: np.asarray(v) for k, v in state.items()})
  flat, names = {}, {}
  for key, value in state.items():
    path, leaf = _to_flax_leaf(weight_files.flax_path(key), value)
    flat[path], names[path] = np.asarray(leaf, np.float32), key
  expected = flax.traverse_util.flatten_dict(param_shapes(AutoencoderKL(**arch))["params"])
  return weight_files.fit_params(flat, expected, what="the VAE checkpoint", names=names,
                                 file_shapes={k: state[n].shape for k, n in names.items()}, torch_name=_torch_name,
                                 torch_shape=lambda _, shape: weight_files.torch_kernel_shape(shape),
                                 hint="; check that config.json belongs to these weights")


def param_shapes(module: AutoencoderKL) -> dict:
  """The variables' shapes (jax.ShapeDtypeStruct pytree) without materialising them."""
  images = jnp.zeros((1, 2 * module.downsampling_factor, 2 * module.downsampling_factor, module.in_channels))
  return jax.eval_shape(lambda: module.init(jax.random.key(0), images))


# ----------------------------------------------------------------------------------------------
# Files.


def read_vae_checkpoint(path) -> Tuple[Dict[str, Any], dict, Dict[str, Any]]:
  """(arch, {'params': ...}, the raw config) of a diffusers VAE folder or pipeline root."""
  folder = weight_files.component_folder(path, "vae", "diffusers VAE")
  config = json.loads((folder / "config.json").read_text())
  arch = arch_from_config(config)
  state = weight_files.read_weights(folder, weight_files.DIFFUSERS_WEIGHTS, "VAE")
  return arch, convert_state_dict(arch, state), config


# ----------------------------------------------------------------------------------------------
# The loaded VAE.


@functools.partial(jax.jit, static_argnames="module")
def _encode(module: AutoencoderKL, params, images, key, scaling, shift):
  mean, logvar = module.apply(params, images, method=AutoencoderKL.encode_moments)
  z = mean if key is None else mean + jnp.exp(0.5 * logvar) * draws.normal(key, mean.shape, mean.dtype)
  return (z - shift) * scaling


@functools.partial(jax.jit, static_argnames="module")
def _decode(module: AutoencoderKL, params, latents, scaling, shift):
  z = jnp.asarray(latents, jnp.float32) / scaling + shift
  return module.apply(params, z, method=AutoencoderKL.decode_latents)


@dataclasses.dataclass(frozen=True)
class VAE:
  """A loaded KL autoencoder and its latent scaling (see load_vae). Jitted once per module and shape,
  shared by every VAE with the same architecture."""
  module: AutoencoderKL
  params: Any
  arch: Dict[str, Any]
  scaling_factor: float
  shift_factor: float = 0.0

  def encode(self, images, key: Optional[jax.Array] = None) -> jax.Array:
    """NHWC images in [-1, 1] -> latents scaling_factor * (z - shift_factor), float32: z the posterior
    mean, or with a PRNG `key` the sample mean + std * jax.random.normal(key, mean.shape)."""
    return _encode(self.module, self.params, jnp.asarray(images), key, self.scaling_factor, self.shift_factor)

  def decode(self, latents) -> jax.Array:
    """Latents as encode returns them -> NHWC images (about [-1, 1]), float32."""
    return _decode(self.module, self.params, latents, self.scaling_factor, self.shift_factor)


def decode_in_batches(decode, latents, batch_size: int) -> np.ndarray:
  """decode(latents) batch by batch (a VAE decoder's activations at full resolution are large), as numpy."""
  return np.concatenate([np.asarray(decode(latents[i:i + batch_size])) for i in range(0, len(latents), batch_size)])


def load_vae(path, *, dtype=jnp.float32, precision=None) -> VAE:
  """The VAE of a diffusers VAE folder or pipeline root; `dtype` is the compute dtype (parameters stay
  float32), `precision` the convolutions' and matmuls' (jax.lax.Precision)."""
  arch, variables, config = read_vae_checkpoint(path)
  scaling, shift = latent_scaling(config)
  module = AutoencoderKL(**arch, dtype=dtype, precision=precision)
  return VAE(module=module, params=jax.tree.map(jnp.asarray, variables), arch=arch, scaling_factor=scaling,
             shift_factor=shift)
