"""SongUNet / preconditioners: parity with EDM's reference outputs, parameter counts, formulas."""
import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from simjax.networks.precond import (EDMPrecond, VEPrecond, VPPrecond, build_precond, count_params,
                                     edm_preset_arch, param_shapes)
from simjax.networks.songunet import SongUNet
from simjax.teachers.edm_checkpoints import convert_state_dict
from simjax.torch_files import load_state_dict

from conftest import FIXTURES  # tests/fixtures, in the repository

FIXTURE_NAMES = ["edm_ddpmpp_tiny_uncond", "edm_ddpmpp_tiny_cond", "edm_ncsnpp_tiny_uncond"]


def _fixture(name):
  path = FIXTURES / f"{name}.npz"
  assert path.is_file(), f"EDM reference fixture {path} is missing: it is part of the repository (tests/fixtures)"
  return path


def _fixture_inputs(data):
  x = data["x_nchw"].transpose(0, 2, 3, 1)
  class_labels = data["class_labels"] if "class_labels" in data.files else None
  augment_labels = data["augment_labels"] if "augment_labels" in data.files else None
  return x, data["sigma"], class_labels, augment_labels


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_parity(name):
  """Converted EDM weights reproduce EDM's own D(x, sigma) (float32, eval mode) within 1e-4.

  precision=HIGHEST: on GPUs the default float32 convolutions use TF32 (seen on an H200: 5.7e-4 error).
  """
  path = _fixture(name)
  with np.load(path) as data:
    arch, variables = convert_state_dict(json.loads(str(data["config_json"])), load_state_dict(path))
    module = build_precond(arch, precision=jax.lax.Precision.HIGHEST)
    x, sigma, class_labels, augment_labels = _fixture_inputs(data)
    out = jax.jit(module.apply)(variables, x, sigma, class_labels, augment_labels)
    expected = data["denoised_nchw"].transpose(0, 2, 3, 1)
  assert out.dtype == jnp.float32 and out.shape == expected.shape
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-4)


def test_fixture_parity_bfloat16_is_close_but_float32_params():
  """bfloat16 compute keeps float32 params and float32 output, and stays near the float32 result."""
  path = _fixture("edm_ddpmpp_tiny_uncond")
  with np.load(path) as data:
    arch, variables = convert_state_dict(json.loads(str(data["config_json"])), load_state_dict(path))
    x, sigma, class_labels, augment_labels = _fixture_inputs(data)
    expected = data["denoised_nchw"].transpose(0, 2, 3, 1)
  out = jax.jit(build_precond(arch, dtype=jnp.bfloat16).apply)(variables, x, sigma, class_labels, augment_labels)
  assert out.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  error = np.abs(np.asarray(out) - expected).max()
  assert 1e-5 < error < 0.1 * np.abs(expected).max()  # really bf16 (not f32), yet close


@pytest.mark.parametrize("label_dim,expected", [(0, 55_733_891), (10, 55_735_299)])
def test_cifar10_ddpmpp_parameter_count(label_dim, expected):
  """EDM's CIFAR-10 DDPM++ (55.7M) has exactly EDM's parameter count; counted via eval_shape."""
  module = build_precond(edm_preset_arch("ddpmpp", label_dim=label_dim))
  shapes = param_shapes(module)
  assert set(shapes) == {"params"}  # buffers are not parameters
  assert count_params(shapes) == expected
  block = shapes["params"]["model"]["enc"]["16x16_block0"]
  assert block["conv0"]["kernel"].shape == (3, 3, 256, 256) and block["norm0"]["scale"].shape == (256,)
  assert block["qkv"]["kernel"].shape == (1, 1, 256, 768)


def _tiny_arch(**overrides):
  arch = dict(precond="EDMPrecond", model_type="SongUNet", img_resolution=8, img_channels=3, label_dim=0,
              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
  arch.update(overrides)
  return arch


def _micro_arch(**overrides):
  """One resolution level: the cheapest network to compile (attention only in the decoder's in0)."""
  return _tiny_arch(channel_mult=[1], attn_resolutions=[], **overrides)


def _random_variables(module, seed=0):
  """Every parameter drawn N(0, 0.3^2) as in the fixtures (EDM zero-inits the output convolutions,
  which would hide the effect of anything upstream). Drawn with numpy from eval_shape: compiling
  jax.random init for ~100 tensors takes tens of seconds on CPU."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32),
                                param_shapes(module))


def test_skip_encoder_and_decoder_layout():
  """encoder_type/decoder_type 'skip' add EDM's aux layers (parameter-free aux_down/aux_up)."""
  module = build_precond(_tiny_arch(encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1]))
  variables = _random_variables(module)
  params = variables["params"]["model"]
  assert "4x4_aux_skip" in params["enc"] and "4x4_aux_down" not in params["enc"]
  assert {"4x4_aux_norm", "4x4_aux_conv", "8x8_aux_norm", "8x8_aux_conv"} <= set(params["dec"])
  assert "8x8_aux_up" not in params["dec"]
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  out = jax.jit(module.apply)(variables, x, jnp.array([0.1, 10.0]))
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_dropout_and_label_dropout_use_the_dropout_rng():
  module = build_precond(_micro_arch(label_dim=4, dropout=0.5, label_dropout=0.5))
  variables = _random_variables(module)
  x, labels = jnp.ones((2, 8, 8, 3)), jax.nn.one_hot(jnp.array([1, 3]), 4)
  train_apply = jax.jit(lambda key: module.apply(variables, x, 1.0, labels, train=True, rngs={"dropout": key}))
  np.testing.assert_array_equal(train_apply(jax.random.key(0)), train_apply(jax.random.key(0)))
  assert np.abs(train_apply(jax.random.key(0)) - train_apply(jax.random.key(1))).max() > 1e-2
  eval_apply = jax.jit(lambda: module.apply(variables, x, 1.0, labels))
  assert np.abs(eval_apply() - train_apply(jax.random.key(0))).max() > 1e-2


def test_class_labels_follow_edm():
  """label_dim 0 ignores labels; a conditional net queried without labels sees all-zero labels."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  uncond = build_precond(_micro_arch())
  variables = _random_variables(uncond)
  apply = jax.jit(uncond.apply)
  np.testing.assert_array_equal(apply(variables, x, 1.0), apply(variables, x, 1.0, jnp.ones((2, 5))))

  cond = build_precond(_micro_arch(label_dim=5))
  variables = _random_variables(cond)
  apply = jax.jit(cond.apply)
  without = apply(variables, x, 1.0)
  np.testing.assert_allclose(without, apply(variables, x, 1.0, jnp.zeros((2, 5))), atol=1e-5)
  assert np.abs(without - apply(variables, x, 1.0, jax.nn.one_hot(jnp.array([0, 4]), 5))).max() > 1e-2


def test_bad_inputs_give_one_line_errors():
  module = build_precond(_tiny_arch())
  variables = param_shapes(module)
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(module.apply, variables, jnp.zeros((1, 3, 8, 8)), 1.0)
  with pytest.raises(ValueError, match="model_type='UNet2D' is not supported"):
    build_precond({"img_resolution": 8, "img_channels": 3, "model_type": "UNet2D"})
  with pytest.raises(ValueError, match="DhariwalUNet arguments"):  # EDMPrecond's default network
    build_precond({"img_resolution": 8, "img_channels": 3, "encoder_type": "skip"})
  with pytest.raises(ValueError, match="unknown"):
    build_precond(_tiny_arch(channels=3))
  with pytest.raises(ValueError, match="encoder_type"):
    param_shapes(build_precond(_tiny_arch(encoder_type="fancy")))


class _ProbeNet(nn.Module):
  """F(x_in, c_noise) = x_in + c_noise: lets D expose c_skip, c_out, c_in and c_noise."""
  dtype = jnp.float32

  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
    return x + noise_labels[:, None, None, None]


def _probe(cls, sigma, **kwargs):
  module = cls(model=_ProbeNet(), img_resolution=1, img_channels=1, **kwargs)
  x = jnp.ones((1, 1, 1, 1), jnp.float32)
  return float(module.apply({}, x, jnp.array([sigma]))[0, 0, 0, 0])


def test_edm_preconditioning_formula():
  # sigma = 1, sigma_data = 0.5: c_skip = 0.2, c_out = 0.5/sqrt(1.25), c_in = 1/sqrt(1.25), c_noise = 0
  # -> D(1) = 0.2 + 0.5/1.25 = 0.6.
  assert _probe(EDMPrecond, 1.0) == pytest.approx(0.6, abs=1e-6)
  # sigma = e^4: c_noise = 1; sigma_data = 1: D(1) = 1/(1+s^2) + s/sqrt(1+s^2) (1/sqrt(1+s^2) + 1).
  s = np.exp(4.0)
  expected = 1 / (1 + s**2) + s / np.sqrt(1 + s**2) * (1 / np.sqrt(1 + s**2) + 1)
  assert _probe(EDMPrecond, s, sigma_data=1.0) == pytest.approx(expected, rel=1e-5)


def test_vp_preconditioning_formula():
  # sigma = 1: c_skip = 1, c_out = -1, c_in = 1/sqrt(2),
  # c_noise = 999 * (sqrt(0.1^2 + 2 * 19.9 * ln 2) - 0.1) / 19.9 = 258.70...
  c_noise = 999 * (np.sqrt(0.01 + 39.8 * np.log(2.0)) - 0.1) / 19.9
  assert c_noise == pytest.approx(258.70, abs=0.01)
  assert _probe(VPPrecond, 1.0) == pytest.approx(1 - (1 / np.sqrt(2) + c_noise), rel=1e-5)
  module = VPPrecond(model=_ProbeNet(), img_resolution=1, img_channels=1)
  assert module.sigma_max == pytest.approx(np.sqrt(np.exp(10.05) - 1), rel=1e-6)  # ~152
  assert module.sigma_min == pytest.approx(0.001, rel=1e-3)


def test_ve_preconditioning_formula():
  # sigma = 2: c_skip = 1, c_out = 2, c_in = 1, c_noise = ln(1) = 0 -> D(1) = 1 + 2 * 1 = 3.
  assert _probe(VEPrecond, 2.0) == pytest.approx(3.0, abs=1e-6)


def test_fourier_frequencies_are_an_attribute_not_a_parameter():
  """NCSN++'s random frequencies live in the arch (module attribute): apply needs only params."""
  arch = _micro_arch(embedding_type="fourier", channel_mult_noise=2)
  module = build_precond(arch)
  variables = _random_variables(module)
  assert "map_noise" not in variables["params"]["model"]
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
  freqs = list(np.linspace(-10.0, 10.0, 16))
  other = build_precond({**arch, "fourier_freqs": freqs})
  assert isinstance(other.model, SongUNet) and other.model.fourier_freqs == tuple(freqs)
  assert np.abs(jax.jit(module.apply)(variables, x, 0.5) - jax.jit(other.apply)(variables, x, 0.5)).max() > 1e-3
  with pytest.raises(ValueError, match="fourier_freqs"):
    param_shapes(build_precond({**arch, "fourier_freqs": [1.0]}))


def _reference_resample(x, resample_filter, up, padding):
  """EDM's resampling straight from torch's definitions, in numpy loops (float64): down is
  conv2d(x, F, groups=C, stride=2, padding) with F = outer(f, f) / sum(f)^2, gathering
  y[i, j] = sum_ab F[a, b] x_pad[2i + a, 2j + b]; up is conv_transpose2d(x, 4 F, ...), scattering
  y[2i + a - p, 2j + b - p] += 4 F[a, b] x[i, j]."""
  f = np.asarray(resample_filter, np.float64)
  kernel, k = np.outer(f, f) / f.sum()**2, len(f)
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  if up:
    y = np.zeros((n, 2 * (h - 1) + k, 2 * (w - 1) + k, c))
    for i in range(h):
      for j in range(w):
        y[:, 2 * i:2 * i + k, 2 * j:2 * j + k, :] += 4 * kernel[None, :, :, None] * x[:, i:i + 1, j:j + 1, :]
    return y[:, padding:y.shape[1] - padding, padding:y.shape[2] - padding, :]
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h, out_w = (x.shape[1] - k) // 2 + 1, (x.shape[2] - k) // 2 + 1
  y = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      y[:, i, j, :] = np.einsum("nabc,ab->nc", x[:, 2 * i:2 * i + k, 2 * j:2 * j + k, :], kernel)
  return y


@pytest.mark.parametrize("path", ["xla_cpu", "accelerator"])
@pytest.mark.parametrize("resample_filter", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("size", [(4, 6), (5, 3)])
def test_both_resampling_forms_equal_edm_conv_definition(resample_filter, size, path):
  """Both forms of EDM's depthwise conv2d / conv_transpose2d: XLA:CPU's slices and reshapes (no grouped or
  dilated convolutions; simjax/xla_cpu.py) and the accelerators' depthwise convolutions, which the CPU
  traces under xla_cpu.plain_forms(). Both filters, up and down, every padding SongUNet uses (fused: 0,
  plain: (K-1)//2), odd sizes included (the [1,1] 2x2-block fast path needs even sizes)."""
  import contextlib
  from simjax import xla_cpu
  from simjax.networks.songunet import downsample_2x, upsample_2x
  x = np.random.default_rng(0).standard_normal((2,) + size + (3,)).astype(np.float32)
  forms = xla_cpu.plain_forms if path == "accelerator" else contextlib.nullcontext
  for padding in sorted({0, (len(resample_filter) - 1) // 2}):
    for up, resample in ((True, upsample_2x), (False, downsample_2x)):
      with forms():
        out = jax.jit(lambda v: resample(v, resample_filter, padding))(x)
        jaxpr = str(jax.make_jaxpr(lambda v: resample(v, resample_filter, padding))(x))
      assert ("conv_general_dilated" in jaxpr) == (path == "accelerator"), (path, up)
      expected = _reference_resample(x, resample_filter, up, padding)
      assert out.shape == expected.shape, (up, padding)
      np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-6, err_msg=f"up={up} padding={padding}")


@pytest.mark.parametrize("resample_filter", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("up", [True, False])
def test_edm_conv2d_resampling_orders(resample_filter, up):
  """EDMConv2d: kernel 0 is pure resampling; fused_resample moves the filter to the cheap side of a
  3x3 convolution with EDM's paddings; both orders agree with the reference resampling + conv."""
  from simjax.networks.songunet import EDMConv2d
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
  w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  f_pad = (len(resample_filter) - 1) // 2
  conv = lambda v, pad: np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(v, jnp.float32), w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST))
  layer = lambda kernel, fused: EDMConv2d(4 if kernel else 3, kernel, use_bias=False, up=up, down=not up,
                                          resample_filter=resample_filter, fused_resample=fused)
  params = lambda kernel: {"params": {"kernel": w}} if kernel else {}
  resampled = layer(0, False).apply({}, x)
  np.testing.assert_allclose(resampled, _reference_resample(x, resample_filter, up, f_pad), atol=1e-6)
  plain = layer(3, False).apply(params(3), x)
  np.testing.assert_allclose(plain, conv(_reference_resample(x, resample_filter, up, f_pad), 1), atol=1e-4)
  fused = layer(3, True).apply(params(3), x)
  if up:  # filter first (padding max(f_pad - 1, 0)), then the conv (padding max(1 - f_pad, 0)).
    expected = conv(_reference_resample(x, resample_filter, True, max(f_pad - 1, 0)), max(1 - f_pad, 0))
  else:  # conv first with padding 1 + f_pad, then the filter without padding.
    expected = _reference_resample(conv(x, 1 + f_pad), resample_filter, False, 0)
  assert fused.shape == expected.shape == ((2, 12, 12, 4) if up else (2, 3, 3, 4))
  np.testing.assert_allclose(fused, expected, atol=1e-4)
