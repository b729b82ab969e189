"""EDM's non-leaking geometric augmentations (Karras et al. 2022, EDM, Appendix F.2), in JAX.

EDM trains its CIFAR-10 networks on augmented images and conditions them on the augmentation
parameters (`augment_labels`, 9 numbers per image), so that at sampling time (labels = 0) the network
produces un-augmented images. A fake score that shares such a network must be trained the same way:
augment stop_grad(x_g) with probability p = 0.12 and pass the labels. This module reproduces the
geometric half of EDM's AugmentPipe (`training/augment.py`) from its maths: the same transforms,
probabilities, parameter distributions, label layout, inverse affine matrix, reflect padding and
resampling (2x upsampling with the symlet-6 wavelet low-pass filter, bilinear sampling at 2x, symlet-6
downsampling). EDM's color transforms, integer rotation and integer translation are not used by EDM's
training presets and are not implemented.

Per image and transform, with multiplier m (probability min(m p, 1) of being applied):
  xflip           w ~ {0, 1}        (m = 1e8 in EDM: applied always, so an x-flip half the time)
  yflip           w ~ {0, 1}
  scale           w ~ N(0, 1)       isotropic scale s = 2^(scale_std w)
  rotate_frac     w ~ U(-pi, pi) rotate_frac_max     rotation angle
  aniso           w ~ N(0, 1), r ~ U(-pi, pi) used with probability aniso_rotate_prob (else 0):
                  scale 2^(aniso_std w) along the direction r and its inverse across it
  translate_frac  (wx, wy) ~ N(0, 1)^2, shift (wx W, wy H) translate_frac_std pixels
A transform not applied has w = 0. Labels, in this order, one group per transform whose multiplier
is > 0 (all six: 9 numbers, EDM's augment_dim = 9):
  [xflip w, yflip w, scale w, cos(w_rot) - 1, sin(w_rot), w_aniso cos r, w_aniso sin r, wx, wy]

The geometric transforms are one affine map in pixel coordinates centred on the image (x right,
y down): output pixel p reads the input at G_inv p, with
  G_inv = S(1/s, 1/s) R(w_rot) [R(-r) S(1/a, a) R(r)] T(-tx, -ty),   a = 2^(aniso_std w_aniso),
R(t) = [[cos t, -sin t], [sin t, cos t]], exactly EDM's composition of inverse matrices.

Differences from EDM, all at the level of edge pixels or float rounding, chosen so that an image's
result depends only on its own key and pixels (vmappable, batch- and sharding-independent):
- EDM reflect-pads each batch by a margin sized to the batch's largest footprint (at most W-1, H-1),
  beyond which its sampler reads zeros. Here every image is reflect-padded by the maximum (W-1, H-1)
  with zeros beyond, which equals EDM wherever EDM's margin covers what an image reads (its purpose);
  they can differ in the outermost filter taps at the corners of strongly rotated/zoomed-out images.
- EDM resamples every image once any geometric transform is enabled; for an image whose parameters are
  all zero that resampling is the identity up to float rounding (the wavelet filter is orthonormal).
  Here such images pass through bit-exactly.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from simjax.errors import UserError

# Daubechies' least-asymmetric wavelet "symlet 6": its low-pass (scaling) filter, the filter EDM's
# geometric augmentation uses for 2x up- and downsampling. Orthonormal: sum h = sqrt(2) and
# sum_k h[k] h[k + 2m] = [m == 0], which makes downsample(upsample(x)) = x.
SYM6 = np.array([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148])
_TAPS = len(SYM6)       # 12
_RING = _TAPS // 4      # 3: output pixels computed beyond each edge, then cropped (the filter's reach)

# EDM's CIFAR-10 training preset (train.py: --augment=0.12 with these multipliers) and AugmentPipe's
# defaults for the distribution widths.
EDM_CIFAR10_P = 0.12
GEOMETRIC_DEFAULTS = dict(xflip=1e8, yflip=1.0, scale=1.0, rotate_frac=1.0, aniso=1.0, translate_frac=1.0,
                          scale_std=0.2, rotate_frac_max=1.0, aniso_std=0.2, aniso_rotate_prob=0.5,
                          translate_frac_std=0.125)
_MULTIPLIERS = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")
_LABELS_PER_TRANSFORM = dict(xflip=1, yflip=1, scale=1, rotate_frac=2, aniso=2, translate_frac=2)


class AugmentParams(NamedTuple):
  """One image's augmentation parameters (each 0 when its transform is not applied)."""
  xflip: jax.Array        # [] 0 or 1
  yflip: jax.Array        # [] 0 or 1
  scale: jax.Array        # [] w: isotropic scale 2^(scale_std w)
  rotate: jax.Array       # [] rotation angle in radians
  aniso: jax.Array        # [] w: anisotropic scale 2^(aniso_std w)
  aniso_angle: jax.Array  # [] r: direction of the anisotropic scaling
  translate: jax.Array    # [2] (wx, wy): shift (wx W, wy H) translate_frac_std pixels


def identity_params() -> AugmentParams:
  """Parameters of no augmentation."""
  z = jnp.zeros((), jnp.float32)
  return AugmentParams(z, z, z, z, z, z, jnp.zeros((2,), jnp.float32))


def _settings(overrides):
  unknown = sorted(set(overrides) - set(GEOMETRIC_DEFAULTS))
  if unknown:
    raise UserError(f"unknown augmentation setting(s) {unknown}; use some of {sorted(GEOMETRIC_DEFAULTS)}.")
  cfg = {**GEOMETRIC_DEFAULTS, **{k: float(v) for k, v in overrides.items()}}
  negative = [k for k in cfg if cfg[k] < 0]
  if negative:
    raise UserError(f"augmentation setting(s) {negative} are negative; use values >= 0.")
  return cfg


def augment_label_dim(**settings) -> int:
  """Number of augmentation labels for these multipliers (9 for EDM's CIFAR-10 preset, the default)."""
  cfg = _settings(settings)
  return sum(n for name, n in _LABELS_PER_TRANSFORM.items() if cfg[name] > 0)


def draw_params(key, p=EDM_CIFAR10_P, **settings) -> AugmentParams:
  """One image's random parameters, per EDM's distributions (see the module docstring)."""
  cfg = _settings(settings)
  key_uniform, key_normal = jax.random.split(key)
  u = jax.random.uniform(key_uniform, (11,), jnp.float32)  # one draw per coin and angle below
  g = jax.random.normal(key_normal, (4,), jnp.float32)     # scale w, aniso w, translation (wx, wy)
  applied = lambda i, name: u[i] < cfg[name] * p           # a multiplier of 0 never applies
  zero = jnp.zeros((), jnp.float32)

  xflip = jnp.where(applied(0, "xflip") & (u[1] < 0.5), 1.0, zero)
  yflip = jnp.where(applied(2, "yflip") & (u[3] < 0.5), 1.0, zero)
  scale = jnp.where(applied(4, "scale"), g[0], zero)
  rotate = jnp.where(applied(5, "rotate_frac"), (u[6] * 2 - 1) * (math.pi * cfg["rotate_frac_max"]), zero)
  aniso = jnp.where(applied(7, "aniso"), g[1], zero)
  # EDM draws the direction independently of whether the scaling applies (harmless: w = 0 -> identity).
  aniso_angle = jnp.where((u[8] < cfg["aniso_rotate_prob"]) & (cfg["aniso"] > 0), (u[9] * 2 - 1) * math.pi, zero)
  translate = jnp.where(applied(10, "translate_frac"), g[2:], 0.0)
  return AugmentParams(xflip, yflip, scale, rotate, aniso, aniso_angle, translate)


def params_to_labels(params: AugmentParams, **settings) -> jax.Array:
  """EDM's augment_labels for one image: float32 [augment_label_dim(**settings)]."""
  cfg = _settings(settings)
  groups = dict(
      xflip=[params.xflip], yflip=[params.yflip], scale=[params.scale],
      rotate_frac=[jnp.cos(params.rotate) - 1, jnp.sin(params.rotate)],
      aniso=[params.aniso * jnp.cos(params.aniso_angle), params.aniso * jnp.sin(params.aniso_angle)],
      translate_frac=[params.translate[0], params.translate[1]])
  entries = [v for name in _MULTIPLIERS if cfg[name] > 0 for v in groups[name]]
  return jnp.stack(entries).astype(jnp.float32) if entries else jnp.zeros((0,), jnp.float32)


def _rotation(t):
  c, s = jnp.cos(t), jnp.sin(t)
  return jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _scaling(sx, sy):
  return jnp.diag(jnp.stack([sx, sy, jnp.ones_like(sx)]))


def inverse_affine(params: AugmentParams, height: int, width: int, **settings) -> jax.Array:
  """G_inv [3, 3]: output pixel (x, y, 1), centred on the image, reads the input at G_inv (x, y, 1)."""
  cfg = _settings(settings)
  s = jnp.exp2(params.scale * cfg["scale_std"])
  a = jnp.exp2(params.aniso * cfg["aniso_std"])
  r = params.aniso_angle
  shift = params.translate * jnp.array([width, height], jnp.float32) * cfg["translate_frac_std"]
  untranslate = jnp.eye(3).at[:2, 2].set(-shift)
  return (_scaling(1 / s, 1 / s) @ _rotation(params.rotate)
          @ _rotation(-r) @ _scaling(1 / a, a) @ _rotation(r) @ untranslate)


def _upsample_matrix(n):
  """[2n, n]: symlet-6 2x upsampling; up-sample k sits at input position k / 2 (EDM's phase)."""
  k, i = np.arange(2 * n)[:, None], np.arange(n)[None, :]
  tap = k + (_TAPS // 2 - 1) - 2 * i
  return np.where((tap >= 0) & (tap < _TAPS), SYM6[np.clip(tap, 0, _TAPS - 1)], 0.0).astype(np.float32)


def _downsample_matrix(n):
  """[n, 2 (n + 2 ring)]: symlet-6 2x downsampling of the ring-extended 2x grid back to n pixels."""
  m, q = np.arange(n)[:, None], np.arange(2 * (n + 2 * _RING))[None, :]
  tap = q - 2 * m - 1
  return np.where((tap >= 0) & (tap < _TAPS), SYM6[np.clip(tap, 0, _TAPS - 1)], 0.0).astype(np.float32)


def _bilinear_zeros(image, ux, uy):
  """image [H, W, C] sampled at float pixel indices (ux, uy) [Q, R]; taps outside the image read 0."""
  h, w = image.shape[:2]
  x0, y0 = jnp.floor(ux), jnp.floor(uy)
  fx, fy = (ux - x0)[..., None], (uy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

  def tap(yi, xi):
    inside = ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h))[..., None]
    return jnp.where(inside, image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)], 0.0)

  return ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
          + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))


def warp(image, g_inv):
  """image [H, W, C] float32 resampled through the inverse affine map g_inv [3, 3] as EDM does.

  Reflect-pad by (H-1, W-1); upsample 2x with symlet 6; at each point of a 2x output grid that extends
  _RING pixels past every edge, sample the upsampled input bilinearly (zeros outside); downsample 2x
  with symlet 6, keeping the H x W image.
  """
  h, w = image.shape[:2]
  padded = jnp.pad(image, ((h - 1, h - 1), (w - 1, w - 1), (0, 0)), mode="reflect")
  up = jnp.einsum("ki,ijc,lj->klc", _upsample_matrix(padded.shape[0]), padded, _upsample_matrix(padded.shape[1]))
  # Output grid at half-pixel steps, in pixels centred on the image: 2x index q <-> pixel q / 2 - ring.
  qy = jnp.arange(2 * (h + 2 * _RING), dtype=jnp.float32) / 2 - _RING - (h - 1) / 2
  qx = jnp.arange(2 * (w + 2 * _RING), dtype=jnp.float32) / 2 - _RING - (w - 1) / 2
  py, px = jnp.meshgrid(qy, qx, indexing="ij")
  sx = g_inv[0, 0] * px + g_inv[0, 1] * py + g_inv[0, 2]
  sy = g_inv[1, 0] * px + g_inv[1, 1] * py + g_inv[1, 2]
  # Centred source pixel -> index in the padded image -> index in its 2x upsampling (pixel i at 2i).
  sampled = _bilinear_zeros(up, 2 * (sx + (w - 1) / 2 + (w - 1)), 2 * (sy + (h - 1) / 2 + (h - 1)))
  return jnp.einsum("mq,qrc,nr->mnc", _downsample_matrix(h), sampled, _downsample_matrix(w))


def apply_params(image, params: AugmentParams, **settings):
  """image [H, W, C] augmented with `params`: flips first, then the geometric warp (EDM's order)."""
  cfg = _settings(settings)
  h, w = image.shape[:2]
  x = jnp.asarray(image, jnp.float32)
  x = jnp.where(params.xflip > 0, x[:, ::-1], x)
  x = jnp.where(params.yflip > 0, x[::-1], x)
  moved = (params.scale != 0) | (params.rotate != 0) | (params.aniso != 0) | jnp.any(params.translate != 0)
  x = jnp.where(moved, warp(x, inverse_affine(params, h, w, **cfg)), x)
  return x.astype(image.dtype)


def augment(key, images, p=EDM_CIFAR10_P, **settings):
  """EDM's geometric augmentation of a batch: (augmented images, augment_labels).

  key: a PRNG key; images: [N, H, W, C] NHWC; p: EDM's overall probability (0.12 for CIFAR-10);
  settings: multipliers and widths (GEOMETRIC_DEFAULTS, EDM's CIFAR-10 preset). Returns images of the
  input's shape and dtype and float32 labels [N, augment_label_dim(**settings)] (9 by default). Image i
  depends only on jax.random.split(key, N)[i] and image i. Jittable; settings are static, p may be traced.
  """
  if getattr(images, "ndim", None) != 4:
    raise UserError(f"augment expects NHWC images [N, H, W, C], got shape {getattr(images, 'shape', None)}; "
                    "add the batch axis.")
  cfg = _settings(settings)
  return _augment_batch(key, images, jnp.asarray(p, jnp.float32), tuple(sorted(cfg.items())))


@functools.partial(jax.jit, static_argnums=3)  # one compiled program per shape and settings, also when eager
def _augment_batch(key, images, p, cfg_items):
  cfg = dict(cfg_items)
  keys = jax.random.split(key, images.shape[0])
  params = jax.vmap(lambda k: draw_params(k, p, **cfg))(keys)
  out = jax.vmap(lambda x, prm: apply_params(x, prm, **cfg))(images, params)
  labels = jax.vmap(lambda prm: params_to_labels(prm, **cfg))(params)
  return out, labels
