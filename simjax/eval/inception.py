"""The FID Inception-v3 network in Flax: pool3 features of the TF 2015-12-05 Inception graph.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", section 4) is defined on the 2048-d pool3 features of one specific network, the
TensorFlow Inception graph dated 2015-12-05. pytorch-fid ports it as `FIDInceptionV3`; published
FIDs (EDM, SiD, SIM) use exactly these weights. This module rebuilds that graph layer by layer, so
the released `pt_inception-2015-12-05-6726825d.pth` loads by a rename and a transpose:

- torchvision's Inception-v3 trunk, every conv a `BasicConv2d` (conv without bias, BatchNorm with
  eps 1e-3 in inference mode, ReLU);
- the FID-specific blocks: Mixed_5b/5c/5d, 6b..6e and 7b average-pool their pool branch with the
  padded zeros left out of the mean (TF semantics, `count_include_pad=False`), and Mixed_7c
  max-pools it instead (a quirk of the 2015 graph that FID inherited);
- input preprocessing: bilinear resize to 299x299 with half-pixel centres and no antialiasing
  (torch's `F.interpolate(mode='bilinear', align_corners=False)`), then x in [0, 1] -> 2x - 1;
- output: the global average pool of Mixed_7c (pool3); the 1008-class head is not built.

Parameter trees mirror the torch module names (`Mixed_5b/branch5x5_2/conv/kernel`, BatchNorm
running statistics under `batch_stats`), so use it as
`FIDInceptionV3().apply({'params': p, 'batch_stats': s}, images_nhwc)`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simjax.errors import UserError

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME)
INCEPTION_RESOLUTION = 299
POOL3_FEATURES = 2048
# torchvision's BasicConv2d uses BatchNorm2d(eps=0.001), not torch's default 1e-5.
BATCHNORM_EPS = 1e-3

# XLA's default float32 conv precision on recent GPUs is TF32 (10-bit mantissa): on an H200 it
# moved pool3 of the parity fixture by up to 0.09 (full float32: 1e-4). FID is compared across
# papers to 0.01, so features are computed in full float32 (about 2,400 img/s on an H200 vs
# 12,400 with TF32, so 50k samples take ~20 s).
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU, as torchvision's BasicConv2d."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)  # symmetric (height, width) zero padding, as torch's Conv2d
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BATCHNORM_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same_excluding_padding(x):
  """3x3 stride-1 average pool whose border windows average only the real pixels (TF 'SAME')."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
  """3x3 stride-1 max pool with 1 pixel of -inf padding (torch's max_pool2d(3, 1, padding=1))."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x):
  """3x3 stride-2 max pool without padding (floor of the output size, as torch)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pooled branches at 35x35."""
  pool_features: int
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
    branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(
        _avg_pool_3x3_same_excluding_padding(x))
    # Channel order matters: the next block's 1x1 kernels index these channels in this order.
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35x35 -> 17x17 (unchanged from torchvision)."""
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = _max_pool_3x3_stride2(x)
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches at 17x17."""
  channels_7x7: int
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
    branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same_excluding_padding(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17x17 -> 8x8 (unchanged from torchvision)."""
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
    branch_pool = _max_pool_3x3_stride2(x)
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool='avg': FIDInceptionE_1) and Mixed_7c (pool='max': FIDInceptionE_2), 8x8."""
  pool: str = "avg"
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
    branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
    ], axis=-1)
    branch3x3dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
    ], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same_excluding_padding(x)
    elif self.pool == "max":
      pooled = _max_pool_3x3_same(x)
    else:
      raise ValueError(f"FIDInceptionE pool={self.pool!r} is not supported; use 'avg' or 'max'.")
    branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


def resize_for_inception(images):
  """Bilinear resize of NHWC images to 299x299 as torch's F.interpolate(align_corners=False).

  Both use half-pixel centres and clamp at the border; torch does not antialias, so neither do we
  (it only matters when downsampling inputs larger than 299).
  """
  n, _, _, c = images.shape
  return jax.image.resize(images, (n, INCEPTION_RESOLUTION, INCEPTION_RESOLUTION, c),
                          method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FIDInceptionV3 up to pool3: NHWC images in [0, 1] -> [N, 2048] features."""
  resize_input: bool = True
  normalize_input: bool = True
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32)
    if self.resize_input:
      x = resize_for_inception(x)
    if self.normalize_input:
      x = 2.0 * x - 1.0  # [0, 1] -> [-1, 1], the range the TF graph was trained on
    conv = functools.partial(BasicConv2d, precision=self.precision)
    kw = dict(precision=self.precision)
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)   # 149x149
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)                   # 147x147
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)   # 147x147
    x = _max_pool_3x3_stride2(x)                                    # 73x73
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)                  # 71x71
    x = _max_pool_3x3_stride2(x)                                    # 35x35
    x = FIDInceptionA(pool_features=32, name="Mixed_5b", **kw)(x)   # 256 channels
    x = FIDInceptionA(pool_features=64, name="Mixed_5c", **kw)(x)   # 288
    x = FIDInceptionA(pool_features=64, name="Mixed_5d", **kw)(x)   # 288
    x = InceptionB(name="Mixed_6a", **kw)(x)                        # 17x17x768
    x = FIDInceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
    x = FIDInceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
    x = FIDInceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
    x = FIDInceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)                        # 8x8x1280
    x = FIDInceptionE(pool="avg", name="Mixed_7b", **kw)(x)         # 8x8x2048
    x = FIDInceptionE(pool="max", name="Mixed_7c", **kw)(x)
    return jnp.mean(x, axis=(1, 2))                                 # pool3


def _images_to_unit_float(images):
  """Checks NHWC RGB layout; uint8 [0, 255] is rescaled to [0, 1], floats are taken as [0, 1]."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(
        f"Inception expects NHWC RGB images [N, H, W, 3], got shape {tuple(images.shape)}; "
        "transpose NCHW to NHWC and tile grayscale to 3 channels.")
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


@jax.jit
def inception_features(variables, images):
  """pool3 features [N, 2048] (float32) of NHWC images in [0, 1] (or uint8 in [0, 255]).

  `variables` is `{'params': ..., 'batch_stats': ...}` from `load_fid_inception` or
  `inception_params_from_torch`. A batch sharded over a mesh's 'data' axis is processed sharded.
  """
  return FIDInceptionV3().apply(variables, _images_to_unit_float(images))


def make_inception_feature_fn(variables, mesh: jax.sharding.Mesh | None = None):
  """`images -> pool3 features`, with the weights replicated over `mesh` when one is given.

  The result is the `feature_fn` that `simjax.eval.fid.compute_fid_stats` streams batches through.
  """
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(variables, replicated)
  return functools.partial(inception_features, variables)


# ---------------------------------------------------------------------------------------------
# Weights: pytorch-fid state_dict -> Flax variables.

_BATCHNORM_TORCH_TO_FLAX = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
# The 1008-class logits head is not part of pool3, and the BN step counter is bookkeeping.
_IGNORED_TORCH_KEYS = ("fc.weight", "fc.bias")


def _flax_path_for_torch_key(key: str) -> tuple[tuple[str, ...], bool] | None:
  """(flax variable path, whether it is an OIHW kernel) for a torch key; None if ignored."""
  if key in _IGNORED_TORCH_KEYS or key.endswith(".num_batches_tracked"):
    return None
  parts = key.split(".")
  *modules, layer, leaf = parts
  if layer == "conv" and leaf == "weight":
    return ("params", *modules, "conv", "kernel"), True
  if layer == "bn" and leaf in _BATCHNORM_TORCH_TO_FLAX:
    collection, flax_leaf = _BATCHNORM_TORCH_TO_FLAX[leaf]
    return (collection, *modules, "bn", flax_leaf), False
  raise UserError(
      f"Unexpected tensor {key!r} in the Inception state dict; pass pytorch-fid's FIDInceptionV3 "
      f"weights ({FID_WEIGHTS_FILENAME}).")


@functools.cache
def _expected_variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened {path: shape} of FIDInceptionV3's variables, from an abstract (free) init."""
  abstract = jax.eval_shape(
      FIDInceptionV3().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, INCEPTION_RESOLUTION, INCEPTION_RESOLUTION, 3), jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  nested: dict = {}
  for path, value in flat.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested


def inception_params_from_torch(state: Mapping[str, np.ndarray]) -> dict:
  """Converts pytorch-fid's FIDInceptionV3 state_dict into `{'params', 'batch_stats'}`.

  Conv kernels go OIHW -> HWIO; BatchNorm weight/bias -> params scale/bias, running mean/var ->
  batch_stats mean/var. The `fc` head and `num_batches_tracked` counters are dropped. Every
  variable of the network must be present with its exact shape.
  """
  expected = _expected_variable_shapes()
  converted: dict[tuple[str, ...], jax.Array] = {}
  for key, value in state.items():
    mapped = _flax_path_for_torch_key(key)
    if mapped is None:
      continue
    path, is_kernel = mapped
    array = np.asarray(value, dtype=np.float32)
    if is_kernel:
      if array.ndim != 4:
        raise UserError(f"Inception tensor {key!r} should be a 4-d OIHW kernel, got shape "
                         f"{array.shape}; pass pytorch-fid's FIDInceptionV3 weights.")
      array = np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    if path not in expected:
      raise UserError(f"Unexpected tensor {key!r} in the Inception state dict; pass "
                       f"pytorch-fid's FIDInceptionV3 weights ({FID_WEIGHTS_FILENAME}).")
    if tuple(array.shape) != expected[path]:
      raise UserError(f"Inception tensor {key!r} has shape {tuple(value.shape)} (converted "
                       f"{array.shape}), expected {expected[path]} after conversion; pass "
                       f"pytorch-fid's FIDInceptionV3 weights ({FID_WEIGHTS_FILENAME}).")
    converted[path] = jnp.asarray(array)
  missing = [".".join(p) for p in expected if p not in converted]
  if missing:
    raise UserError(f"The Inception state dict lacks {len(missing)} of {len(expected)} variables "
                     f"(first: {missing[:3]}); pass pytorch-fid's FIDInceptionV3 weights "
                     f"({FID_WEIGHTS_FILENAME}).")
  return _unflatten(converted)


class InceptionWeightsNotFoundError(FileNotFoundError, UserError):
  """The FID Inception weights file is missing (both a UserError and a FileNotFoundError)."""


def load_fid_inception(path: str | os.PathLike | None) -> dict:
  """Loads `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release) as Flax variables.

  Nothing is downloaded: the user fetches the file once and passes its path (config key
  `eval.inception_path`). Reading the .pth needs no torch (`simjax.torch_files`).
  """
  if not path or not os.path.isfile(os.fspath(path)):
    shown = repr(os.fspath(path)) if path else "(no path given)"
    raise InceptionWeightsNotFoundError(
        f"FID Inception weights not found at {shown}: download "
        f"{FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL} and pass its path as "
        "--config.eval.inception_path=... (or load_fid_inception(path)).")
  from simjax.torch_files import load_state_dict  # pylint: disable=import-outside-toplevel
  return inception_params_from_torch(load_state_dict(os.fspath(path)))
