"""EDM's preconditioners (Karras et al. 2022, Table 1) wrapping a SongUNet or DhariwalUNet, EDM2's
(Karras et al. 2024) wrapping its EDM2UNet, plus builders.

Each preconditioner is a denoiser with simjax's interface
`__call__(x, sigma, cond=None, augment_labels=None, train=False) -> D(x, sigma)` (float32,
x's shape; with return_logits=True, (D, the network's encoder logits), SiDA's discriminator),
D(x) = c_skip x + c_out F(c_in x, c_noise); `cond` is None or one-hot class labels (EDM's
`class_labels`; simjax.conditioning). The raw network is the attribute `model`, so
parameter paths start with 'model' exactly like EDM's state dicts (EDM2's: `unet`, its name there).

Architectures are described by EDM-style kwargs dicts ("arch"): EDMPrecond/VPPrecond/VEPrecond
constructor arguments merged with the network's (SongUNet's or DhariwalUNet's, chosen by
`model_type` as in EDM: EDMPrecond defaults to DhariwalUNet, VP/VE to SongUNet, EDM2Precond takes
EDM2UNet), plus `precond` (the
class name; EDM pickles store it as the object's class, the fixtures as a key). `class_name`
('training.networks.EDMPrecond', EDM's training config) is accepted in its place. `use_fp16` is
accepted and ignored (choose `dtype`).
"""
import math
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simjax.diffusion.edm import SIGMA_DATA, edm_precondition, expand_to
from simjax.networks.dhariwalunet import DhariwalUNet
from simjax.networks.edm2 import EDM2UNet, MPConv, fourier_buffers, mp_fourier
from simjax.networks.songunet import SongUNet

Dtype = Any


def _prepare_inputs(x, sigma, cond, label_dim):
  """float32 x, per-sample sigma [N], class labels per EDM (None when label_dim == 0, zeros if missing)."""
  if isinstance(cond, dict):
    raise ValueError("EDM's networks are conditioned on class labels, not text; use a text-conditioned network.")
  class_labels = cond
  x = jnp.asarray(x, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma = jnp.broadcast_to(sigma.reshape(-1) if sigma.ndim else sigma, x.shape[:1])
  if label_dim == 0:
    class_labels = None
  elif class_labels is None:
    class_labels = jnp.zeros((1, label_dim), jnp.float32)  # EDM: unconditional query of a conditional net.
  else:
    class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, label_dim)
  return x, sigma, class_labels


def _denoise(model, x, c_skip, c_out, c_in, c_noise, class_labels, augment_labels, train, return_logits):
  """D = c_skip x + c_out F(c_in x, c_noise), F run in the model's dtype, D in float32; with return_logits,
  (D, the network's discriminator logits)."""
  model_dtype = getattr(model, "dtype", jnp.float32)
  kwargs = {"return_logits": True} if return_logits else {}
  out = model((expand_to(c_in, x) * x).astype(model_dtype), c_noise, class_labels=class_labels,
              augment_labels=augment_labels, train=train, **kwargs)
  f_x, logits = out if return_logits else (out, None)
  chex.assert_equal_shape([f_x, x])  # the raw network maps images to images of the same shape
  denoised = expand_to(c_skip, x) * x + expand_to(c_out, x) * f_x.astype(jnp.float32)
  return (denoised, logits) if return_logits else denoised


class EDMPrecond(nn.Module):
  """EDM preconditioning: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
  c_noise = ln(s)/4 (Karras et al. 2022, Table 1, "Ours")."""
  model: nn.Module
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  sigma_data: float = SIGMA_DATA
  sigma_min: float = 0.0
  sigma_max: float = math.inf

  def __call__(self, x, sigma, cond=None, augment_labels=None, train=False, return_logits=False):
    x, sigma, class_labels = _prepare_inputs(x, sigma, cond, self.label_dim)
    c = edm_precondition(sigma, self.sigma_data)
    return _denoise(self.model, x, c.c_skip, c.c_out, c.c_in, c.c_noise, class_labels, augment_labels, train,
                    return_logits)


class VPPrecond(nn.Module):
  """Variance-preserving preconditioning (Song et al. 2021 VP SDE; Karras et al. 2022, Table 1):
  c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) t(s), t = sigma^-1 of
  sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""
  model: nn.Module
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000
  epsilon_t: float = 1e-5

  def sigma(self, t):
    t = jnp.asarray(t, jnp.float32)
    return jnp.sqrt(jnp.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1)

  def sigma_inv(self, sigma):
    sigma = jnp.asarray(sigma, jnp.float32)
    return (jnp.sqrt(self.beta_min**2 + 2 * self.beta_d * jnp.log(1 + sigma**2)) - self.beta_min) / self.beta_d

  @property
  def sigma_min(self):
    return float(np.sqrt(np.expm1(0.5 * self.beta_d * self.epsilon_t**2 + self.beta_min * self.epsilon_t)))

  @property
  def sigma_max(self):
    return float(np.sqrt(np.expm1(0.5 * self.beta_d + self.beta_min)))

  def __call__(self, x, sigma, cond=None, augment_labels=None, train=False, return_logits=False):
    x, sigma, class_labels = _prepare_inputs(x, sigma, cond, self.label_dim)
    c_in = 1 / jnp.sqrt(sigma**2 + 1)
    c_noise = (self.M - 1) * self.sigma_inv(sigma)
    return _denoise(self.model, x, jnp.ones_like(sigma), -sigma, c_in, c_noise, class_labels,
                    augment_labels, train, return_logits)


class VEPrecond(nn.Module):
  """Variance-exploding preconditioning (Song et al. 2021 VE SDE; Karras et al. 2022, Table 1):
  c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""
  model: nn.Module
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def __call__(self, x, sigma, cond=None, augment_labels=None, train=False, return_logits=False):
    x, sigma, class_labels = _prepare_inputs(x, sigma, cond, self.label_dim)
    return _denoise(self.model, x, jnp.ones_like(sigma), sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma),
                    class_labels, augment_labels, train, return_logits)


class EDM2Precond(nn.Module):
  """EDM2's preconditioner (NVlabs/edm2 `Precond`): EDM's coefficients around an EDM2UNet, plus the
  uncertainty head logvar(sigma) = MPConv(MPFourier(c_noise)) (EDM2 Eq. 21), returned with
  return_logvar=True as (D, logvar [N, 1, 1, 1]). The network is the attribute `unet` (EDM2's name, so
  parameter paths start with 'unet'); `model` is the same network, simjax's name for it."""
  unet: nn.Module
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  sigma_data: float = SIGMA_DATA
  logvar_channels: int = 128
  logvar_fourier_freqs: Any = None  # EDM2 buffer logvar_fourier.freqs; None: a deterministic draw
  logvar_fourier_phases: Any = None  # EDM2 buffer logvar_fourier.phases
  sigma_min: float = 0.0
  sigma_max: float = math.inf

  NETWORK_FIELD = "unet"
  # torch buffer -> arch key: the fixed random Fourier buffers, which the converter moves into the arch.
  ARCH_BUFFERS = {"unet.emb_fourier.freqs": "emb_fourier_freqs", "unet.emb_fourier.phases": "emb_fourier_phases",
                  "logvar_fourier.freqs": "logvar_fourier_freqs", "logvar_fourier.phases": "logvar_fourier_phases"}

  @property
  def model(self):
    return self.unet

  @nn.compact
  def __call__(self, x, sigma, cond=None, augment_labels=None, train=False, return_logits=False,
               return_logvar=False):
    x, sigma, class_labels = _prepare_inputs(x, sigma, cond, self.label_dim)
    c = edm_precondition(sigma, self.sigma_data)
    out = _denoise(self.unet, x, c.c_skip, c.c_out, c.c_in, c.c_noise, class_labels, augment_labels, train,
                   return_logits)
    # Always built, so that every checkpoint tensor has its parameter; XLA drops it when unused.
    logvar = _logvar_layer(self, name="logvar_linear")(_logvar_features(self, sigma))
    if return_logvar:
      return out, logvar.reshape(-1, 1, 1, 1)
    return out


def _logvar_features(precond: EDM2Precond, sigma):
  """MPFourier(c_noise) of EDM2's uncertainty head: [N, logvar_channels]."""
  buffers = fourier_buffers(precond.logvar_fourier_freqs, precond.logvar_fourier_phases, precond.logvar_channels,
                            seed=1, what="EDM2Precond's uncertainty head")
  return mp_fourier(edm_precondition(sigma, precond.sigma_data).c_noise, buffers.freqs, buffers.phases)


def _logvar_layer(precond: EDM2Precond, **kwargs):
  return MPConv(1, 0, jnp.float32, getattr(precond.unet, "precision", None), **kwargs)


def edm2_logvar(precond: EDM2Precond, params, sigma):
  """EDM2's uncertainty u(sigma) [N] from an EDM2Precond's 'params' alone: the head reads sigma only, so no
  U-Net pass is needed (what __call__(..., return_logvar=True) returns beside D, flattened)."""
  sigma = jnp.asarray(sigma, jnp.float32).reshape(-1)
  u = _logvar_layer(precond).apply({"params": params["logvar_linear"]}, _logvar_features(precond, sigma))
  return u.reshape(-1)


PRECONDITIONERS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
                   "EDM2Precond": EDM2Precond}
_PRECOND_ARGS = {
    "EDMPrecond": ("sigma_min", "sigma_max", "sigma_data"),
    "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"),
    "VEPrecond": ("sigma_min", "sigma_max"),
    "EDM2Precond": ("sigma_data", "logvar_channels", "logvar_fourier_freqs", "logvar_fourier_phases"),
}
_SONGUNET_ARGS = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                  "attn_resolutions", "dropout", "label_dropout", "embedding_type", "channel_mult_noise",
                  "encoder_type", "decoder_type", "resample_filter", "fourier_freqs")
_DHARIWALUNET_ARGS = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                      "attn_resolutions", "dropout", "label_dropout")
_EDM2UNET_ARGS = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
                  "attn_resolutions", "label_balance", "concat_balance", "resample_filter", "channels_per_head",
                  "dropout", "res_balance", "attn_balance", "clip_act", "label_dropout", "emb_fourier_freqs",
                  "emb_fourier_phases")
MODEL_TYPES = {"SongUNet": (SongUNet, _SONGUNET_ARGS), "DhariwalUNet": (DhariwalUNet, _DHARIWALUNET_ARGS),
               "EDM2UNet": (EDM2UNet, _EDM2UNET_ARGS)}
# The network each preconditioner wraps by default (EDM's: EDMPrecond -> DhariwalUNet, VP/VE -> SongUNet),
# and the networks it may wrap.
_DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet",
                  "EDM2Precond": "EDM2UNet"}
_ALLOWED_MODELS = {"EDMPrecond": ("SongUNet", "DhariwalUNet"), "VPPrecond": ("SongUNet", "DhariwalUNet"),
                   "VEPrecond": ("SongUNet", "DhariwalUNet"), "EDM2Precond": ("EDM2UNet",)}
_TUPLE_ARGS = ("channel_mult", "attn_resolutions", "resample_filter", "fourier_freqs", "emb_fourier_freqs",
               "emb_fourier_phases", "logvar_fourier_freqs", "logvar_fourier_phases")
_IGNORED_ARGS = ("use_fp16",)  # EDM's CUDA fp16 switch; simjax takes `dtype` instead.

# EDM's train.py presets (--arch=ddpmpp / ncsnpp at CIFAR-10 settings: augment_dim 9, dropout 0.13; --arch=adm
# as EDM's ImageNet-64 run: --augment=0, dropout 0.1) and EDM2's train_edm2.py presets (edm2-img512-*/img64-*:
# model_channels and dropout; the rest at EDM2's defaults).
EDM_PRESETS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], augment_dim=0, dropout=0.1),
    **{f"edm2-{size}": dict(precond="EDM2Precond", model_channels=channels, dropout=dropout)
       for size, channels, dropout in [("xxs", 64, 0.0), ("xs", 128, 0.0), ("s", 192, 0.0), ("m", 256, 0.1),
                                       ("l", 320, 0.1), ("xl", 384, 0.1), ("xxl", 448, 0.1)]},
}
_EDM_PRESET_DEFAULTS = dict(precond="EDMPrecond", augment_dim=9, dropout=0.13)  # EDM's CIFAR-10 settings


def edm_preset_arch(name: str = "ddpmpp", *, img_resolution: int = 32, img_channels: int = 3, label_dim: int = 0,
                    **overrides) -> dict:
  """An arch dict for EDM's `--arch` preset or EDM2's preset `name`; overrides win."""
  if name not in EDM_PRESETS:
    raise ValueError(f"unknown preset {name!r}; use one of {sorted(EDM_PRESETS)}.")
  arch = dict(_EDM_PRESET_DEFAULTS, img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
  if EDM_PRESETS[name].get("precond") == "EDM2Precond":
    del arch["augment_dim"]  # EDM2 has no augmentation conditioning
  arch.update(EDM_PRESETS[name])
  arch.update(overrides)
  return arch


def _precond_of(model_type: str) -> str:
  return next(p for p, models in _ALLOWED_MODELS.items() if model_type in models)


# EDM2's preconditioner class is called plain `Precond` (training.networks_edm2.Precond).
PRECOND_ALIASES = {"Precond": "EDM2Precond"}


def precond_name_of(arch: Mapping[str, Any]) -> str:
  """The preconditioner class named by an arch dict ('precond', else EDM's 'class_name')."""
  name = arch.get("precond")
  if name is None and "class_name" in arch:
    name = str(arch["class_name"]).rsplit(".", 1)[-1]
  name = PRECOND_ALIASES.get(name, name or "EDMPrecond")
  if name not in PRECONDITIONERS:
    raise ValueError(f"preconditioner {name!r} is not supported; use one of {sorted(PRECONDITIONERS)}.")
  return name


def build_precond(arch: Mapping[str, Any], *, dtype: Dtype = jnp.float32, precision=None) -> nn.Module:
  """Builds preconditioner(SongUNet or DhariwalUNet) from an EDM-style kwargs dict (fixture `config_json` or the
  `init_kwargs` of an EDM pickle with `precond` added). `dtype` is the network's compute dtype."""
  arch = dict(arch)
  precond = precond_name_of(arch)
  arch.pop("precond", None)
  arch.pop("class_name", None)
  model_type = arch.pop("model_type", _DEFAULT_MODEL[precond])
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not supported; simjax implements "
                     f"{', '.join(MODEL_TYPES)}.")
  if model_type not in _ALLOWED_MODELS[precond]:
    raise ValueError(f"{precond} does not wrap {model_type}; use model_type "
                     f"{' or '.join(_ALLOWED_MODELS[precond])} (or precond {_precond_of(model_type)}).")
  model_cls, model_args = MODEL_TYPES[model_type]
  for key in ("img_resolution", "img_channels"):
    if key not in arch:
      raise ValueError(f"architecture is missing {key!r}; add it to the arch dict (EDM's precond kwargs).")
  for key in _IGNORED_ARGS:
    arch.pop(key, None)
  unknown = sorted(set(arch) - set(_PRECOND_ARGS[precond]) - set(model_args) - {"img_resolution", "img_channels",
                                                                                "label_dim"})
  if unknown:
    raise ValueError(f"unknown {precond}/{model_type} arguments {unknown}; remove them from the arch dict.")
  model_kwargs = {k: (tuple(arch[k]) if k in _TUPLE_ARGS and arch[k] is not None else arch[k])
                  for k in model_args if k in arch}
  label_dim = int(arch.get("label_dim", 0))
  model = model_cls(img_resolution=int(arch["img_resolution"]), in_channels=int(arch["img_channels"]),
                   out_channels=int(arch["img_channels"]), label_dim=label_dim, dtype=dtype, precision=precision,
                   **model_kwargs)
  precond_kwargs = {k: (tuple(arch[k]) if k in _TUPLE_ARGS and arch[k] is not None else arch[k])
                    for k in _PRECOND_ARGS[precond] if k in arch}
  network_field = getattr(PRECONDITIONERS[precond], "NETWORK_FIELD", "model")
  return PRECONDITIONERS[precond](**{network_field: model}, img_resolution=int(arch["img_resolution"]),
                                  img_channels=int(arch["img_channels"]), label_dim=label_dim, **precond_kwargs)


def example_inputs(module: nn.Module, batch_size: int = 1):
  """Zero inputs (x NHWC, sigma, class_labels, augment_labels) of the right shapes for `module`."""
  x = jnp.zeros((batch_size, module.img_resolution, module.img_resolution, module.img_channels), jnp.float32)
  sigma = jnp.ones((batch_size,), jnp.float32)
  class_labels = jnp.zeros((batch_size, module.label_dim), jnp.float32) if module.label_dim else None
  augment_dim = getattr(module.model, "augment_dim", 0)
  augment_labels = jnp.zeros((batch_size, augment_dim), jnp.float32) if augment_dim else None
  return x, sigma, class_labels, augment_labels


def init_params(module: nn.Module, rng) -> dict:
  """Fresh variables `{'params': ...}` for a preconditioned network (EDM's initialisation)."""
  x, sigma, class_labels, augment_labels = example_inputs(module)
  return module.init(rng, x, sigma, class_labels, augment_labels)


def param_shapes(module: nn.Module) -> dict:
  """The variables' shapes/dtypes (jax.ShapeDtypeStruct pytree) without materialising them."""
  return jax.eval_shape(lambda: init_params(module, jax.random.key(0)))


def count_params(params) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs (EDM counts parameters only)."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
