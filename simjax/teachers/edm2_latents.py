"""EDM2's latent space: Stable Diffusion VAE latents, normalised per channel, as EDM2's ImageNet-512 networks denoise them.

EDM2's `StabilityVAEEncoder` (NVlabs/edm2 `training/encoders.py`, Karras et al. 2024 Appendix) feeds pixels
in [0, 1] (not Stable Diffusion's [-1, 1]) to the VAE (stabilityai/sd-vae-ft-mse), takes raw latents as the
posterior's mean + std * noise (no scaling_factor), and normalises them per channel:
final = raw * scale + bias, scale = final_std / raw_std, bias = final_mean - raw_mean * scale (EDM2's
defaults raw_mean (5.81, 3.25, 0.12, -2.15), raw_std (4.17, 4.62, 3.71, 3.28), final_mean 0, final_std 0.5).
Decoding inverts it: raw = (x - bias) / scale, the VAE decoder, clamp to [0, 1].

The normalisation travels with the network: an EDM2 pickle's `encoder` record (its stored scale and bias,
read without running code) or, in a converted checkpoint directory, `latents.json`. The VAE comes from a
diffusers folder the config names (`simjax.teachers.vae_checkpoints`, with diffusers parity).
`LatentCodec.decode` returns images in [-1, 1], simjax's image range, so evaluation decodes generated
latents before computing features.
"""
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from simjax import draws
from simjax import storage, torch_files
from simjax.networks.vae import AutoencoderKL

LATENTS_FILE = "latents.json"  # beside arch.json in a converted checkpoint directory
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)


@dataclasses.dataclass(frozen=True)
class LatentNormalization:
  """final = raw * scale + bias per channel (EDM2's StabilityVAEEncoder)."""
  scale: Tuple[float, ...]
  bias: Tuple[float, ...]
  vae_name: str = ""

  def __post_init__(self):
    if len(self.scale) != len(self.bias) or not self.scale or not all(np.isfinite(self.scale + self.bias)):
      raise ValueError(f"a latent normalisation needs finite scale and bias of one length, got {len(self.scale)} "
                       f"scales and {len(self.bias)} biases.")
    if any(s == 0 for s in self.scale):
      raise ValueError("a latent normalisation's scale must be non-zero in every channel.")

  @classmethod
  def from_stats(cls, raw_mean: Sequence[float] = EDM2_RAW_MEAN, raw_std: Sequence[float] = EDM2_RAW_STD,
                 final_mean: float = 0.0, final_std: float = 0.5, vae_name: str = "") -> "LatentNormalization":
    """EDM2's construction from the raw latents' statistics, in float32 as EDM2 computes it."""
    scale = np.float32(final_std) / np.asarray(raw_std, np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, np.float32) * scale
    return cls(tuple(float(v) for v in scale), tuple(float(v) for v in bias), vae_name)

  def to_json(self) -> Dict[str, Any]:
    return {"class_name": "StabilityVAEEncoder", "scale": list(self.scale), "bias": list(self.bias),
            "vae_name": self.vae_name}

  @classmethod
  def from_json(cls, record: Dict[str, Any]) -> "LatentNormalization":
    return cls(tuple(float(v) for v in record["scale"]), tuple(float(v) for v in record["bias"]),
               str(record.get("vae_name", "")))


def read_latent_normalization(path) -> Optional[LatentNormalization]:
  """The latent normalisation a teacher checkpoint carries (EDM2 pickle or converted directory), None for
  a pixel-space network (EDM's pickles, EDM2's StandardRGBEncoder, state dicts)."""
  path = Path(path)
  if path.is_dir():
    record = path / LATENTS_FILE
    return LatentNormalization.from_json(json.loads(record.read_text())) if record.is_file() else None
  if path.suffix not in (".pkl", ".pickle"):
    return None
  return from_encoder_record(torch_files.load_edm_pickle_encoder(path))


def from_encoder_record(record: Dict[str, Any]) -> Optional[LatentNormalization]:
  """The normalisation of an EDM2 pickle's encoder record (`torch_files.read_edm_network_pickle`); None for
  a pixel-space encoder or none."""
  if record.get("class_name") != "StabilityVAEEncoder":
    return None
  return LatentNormalization(tuple(record["scale"]), tuple(record["bias"]), record.get("vae_name", ""))


def write_latent_normalization(directory, norm: Optional[LatentNormalization]) -> None:
  """latents.json into a converted checkpoint's (staging) directory; nothing for a pixel-space network."""
  if norm is not None:
    storage.atomic_write_bytes(epath.Path(directory) / LATENTS_FILE,
                               (json.dumps(norm.to_json(), indent=1) + "\n").encode())


@functools.partial(jax.jit, static_argnames="module")
def _decode(module: AutoencoderKL, params, latents, scale, bias):
  raw = (jnp.asarray(latents, jnp.float32) - bias) / scale
  pixels01 = module.apply(params, raw, method=AutoencoderKL.decode_latents)
  return jnp.clip(pixels01, 0.0, 1.0) * 2.0 - 1.0


@functools.partial(jax.jit, static_argnames="module")
def _encode(module: AutoencoderKL, params, images, key, scale, bias):
  mean, logvar = module.apply(params, (jnp.asarray(images, jnp.float32) + 1.0) / 2.0,
                              method=AutoencoderKL.encode_moments)
  raw = mean if key is None else mean + jnp.exp(0.5 * logvar) * draws.normal(key, mean.shape, mean.dtype)
  return raw * scale + bias


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """A VAE (simjax.teachers.vae_checkpoints.VAE) and EDM2's latent normalisation."""
  vae: Any
  norm: LatentNormalization

  def _consts(self):
    return jnp.asarray(self.norm.scale, jnp.float32), jnp.asarray(self.norm.bias, jnp.float32)

  @property
  def latent_channels(self) -> int:
    return len(self.norm.scale)

  def decode(self, latents) -> jax.Array:
    """Normalised latents [N, h, w, C] -> NHWC images in [-1, 1], float32 (EDM2's decode, then x 2 - 1)."""
    return _decode(self.vae.module, self.vae.params, latents, *self._consts())

  def encode(self, images, key: Optional[jax.Array] = None) -> jax.Array:
    """NHWC images in [-1, 1] -> normalised latents: the posterior mean, or with `key` a sample of it."""
    return _encode(self.vae.module, self.vae.params, images, key, *self._consts())


def load_latent_codec(vae_path, norm: LatentNormalization, *, dtype=jnp.float32, precision=None) -> LatentCodec:
  """The LatentCodec of a diffusers VAE folder (or pipeline root) and a normalisation, checked to agree."""
  from simjax.teachers.vae_checkpoints import load_vae  # pylint: disable=import-outside-toplevel
  vae = load_vae(vae_path, dtype=dtype, precision=precision)
  if vae.module.latent_channels != len(norm.scale):
    raise ValueError(f"the VAE at {vae_path} has {vae.module.latent_channels} latent channels but the teacher's "
                     f"latent normalisation has {len(norm.scale)}; use the VAE the teacher was trained with.")
  return LatentCodec(vae, norm)
