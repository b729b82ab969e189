"""DhariwalUNet (EDM's ADM, ImageNet-64): parity with EDM's reference outputs, EDM's parameter count,
loading EDM-format pickles through the restricted reader."""
import json
import pickle

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simjax.networks.dhariwalunet import DhariwalUNet
from simjax.networks.precond import EDMPrecond, build_precond, count_params, param_shapes
from simjax.teachers.edm_checkpoints import Teacher, convert_state_dict, load_teacher
from simjax.torch_files import UnsafePickleError, load_edm_pickle, load_state_dict

from conftest import FIXTURES  # tests/fixtures, in the repository
from test_edm_loading import Call, Global, _Evil, _crafted_edm_pickle

FIXTURE = FIXTURES / "edm_adm_tiny_cond.npz"
HIGHEST = jax.lax.Precision.HIGHEST  # parity within 1e-4 also on GPUs, whose float32 default is TF32

# EDM's published edm-imagenet-64x64-cond-adm: train.py --arch=adm --cond=1 --augment=0 (augment_dim 0),
# i.e. EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet',
# model_channels=192, channel_mult=[1, 2, 3, 4]) with DhariwalUNet's defaults (num_blocks 3,
# attention at 32, 16, 8, channel_mult_emb 4).
IMAGENET64_ARCH = dict(precond="EDMPrecond", img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True,
                       model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1)
# sum(p.numel() for p in net.parameters()) of NVlabs/edm's own EDMPrecond built with IMAGENET64_ARCH on
# torch's meta device (NVlabs/edm commit 008a4e5, torch 2; see tests/fixtures/README.md): "296M".
IMAGENET64_PARAMS = 295_899_267


def _load_fixture():
  assert FIXTURE.is_file(), f"EDM reference fixture {FIXTURE} is missing: it is part of the repository (tests/fixtures)"
  with np.load(FIXTURE) as data:
    config = json.loads(str(data["config_json"]))
    state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
    inputs = {k: data[k] for k in ("x_nchw", "sigma", "class_labels", "augment_labels", "denoised_nchw")}
  return config, state, inputs


def _denoise(arch, variables, inputs):
  module = build_precond(arch, precision=HIGHEST)
  x = inputs["x_nchw"].transpose(0, 2, 3, 1)
  out = jax.jit(module.apply)(variables, x, inputs["sigma"], inputs["class_labels"], inputs["augment_labels"])
  return np.asarray(out), inputs["denoised_nchw"].transpose(0, 2, 3, 1)


def test_fixture_parity():
  """Converted EDM weights reproduce EDM's own EDMPrecond(DhariwalUNet) D(x, sigma) within 1e-4."""
  config, _, inputs = _load_fixture()
  arch, variables = convert_state_dict(config, load_state_dict(FIXTURE))
  assert isinstance(build_precond(arch).model, DhariwalUNet)
  out, expected = _denoise(arch, variables, inputs)
  error = np.abs(out - expected).max()
  print(f"DhariwalUNet parity vs EDM (edm_adm_tiny_cond): max abs error {error:.3g}, "
        f"max |D| {np.abs(expected).max():.3g}")
  assert out.dtype == np.float32 and out.shape == expected.shape
  assert error < 1e-4


def test_wrong_weights_fail_parity():
  """The parity test can fail: a kernel converted without the OIHW->HWIO spatial order (flipped 3x3
  kernels) or permuted class-embedding rows give errors far above 1e-4."""
  config, state, inputs = _load_fixture()
  arch, variables = convert_state_dict(config, state)
  flat = flax.traverse_util.flatten_dict(variables)

  flipped = dict(flat)
  for path, value in flat.items():
    if path[-1] == "kernel" and value.ndim == 4 and value.shape[0] == 3:
      flipped[path] = value[::-1, ::-1]
  out, expected = _denoise(arch, flax.traverse_util.unflatten_dict(flipped), inputs)
  assert np.abs(out - expected).max() > 1e-2

  permuted = dict(flat)
  label_path = ("params", "model", "map_label", "kernel")
  permuted[label_path] = flat[label_path][::-1]
  out, expected = _denoise(arch, flax.traverse_util.unflatten_dict(permuted), inputs)
  assert np.abs(out - expected).max() > 1e-2


def test_imagenet64_parameter_count():
  """EDM's ImageNet-64 ADM has exactly EDM's parameter count (via eval_shape; EDMPrecond's default network)."""
  arch = dict(IMAGENET64_ARCH)
  module = build_precond(arch)
  assert isinstance(module, EDMPrecond) and isinstance(module.model, DhariwalUNet)
  arch.pop("model_type")  # EDMPrecond's default model_type is DhariwalUNet, as in EDM
  assert build_precond(arch).model == module.model
  shapes = param_shapes(module)
  assert set(shapes) == {"params"}  # buffers are not parameters
  assert count_params(shapes) == IMAGENET64_PARAMS
  model = shapes["params"]["model"]
  assert model["enc"]["64x64_conv"]["kernel"].shape == (3, 3, 3, 192)
  assert model["map_label"]["kernel"].shape == (1000, 768) and "bias" not in model["map_label"]
  block = model["enc"]["16x16_block0"]  # 384 -> 576 channels, 9 heads
  assert block["conv0"]["kernel"].shape == (3, 3, 384, 576) and block["affine"]["kernel"].shape == (768, 1152)
  assert block["qkv"]["kernel"].shape == (1, 1, 576, 1728) and block["skip"]["kernel"].shape == (1, 1, 384, 576)
  assert "skip" not in model["enc"]["32x32_down"]  # resampling skip without projection
  assert "qkv" not in model["enc"]["64x64_block0"] and "qkv" in model["dec"]["32x32_block0"]
  assert model["out_conv"]["kernel"].shape == (3, 3, 192, 3)


@pytest.mark.parametrize("drop_model_type", [False, True])
def test_crafted_edm_pickle_teacher_reproduces_edm(tmp_path, drop_model_type):
  """An EDM-format ADM pickle -> restricted reader -> load_teacher -> EDM's reference output; the
  code embedded in the pickle never runs."""
  config, state, inputs = _load_fixture()
  if drop_model_type:
    config.pop("model_type")
  marker = tmp_path / "module_src_was_executed"
  path = tmp_path / "network-snapshot.pkl"
  path.write_bytes(_crafted_edm_pickle(config, state, marker))
  kwargs, _ = load_edm_pickle(path)
  assert kwargs == dict(config, use_fp16=False)
  teacher = load_teacher(path, precision=HIGHEST)
  assert isinstance(teacher, Teacher) and isinstance(teacher.module.model, DhariwalUNet)
  assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (8, 3, 10)
  out = teacher.denoise(inputs["x_nchw"].transpose(0, 2, 3, 1), inputs["sigma"], inputs["class_labels"],
                        inputs["augment_labels"])
  np.testing.assert_allclose(np.asarray(out), inputs["denoised_nchw"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
  assert not marker.exists()


def test_malicious_adm_pickle_is_refused_and_never_runs(tmp_path):
  config, state, _ = _load_fixture()
  marker = tmp_path / "pwned"
  path = tmp_path / "net.pkl"
  # A shell command hidden inside the ADM network's state ...
  path.write_bytes(_crafted_edm_pickle(config, state, tmp_path / "src_marker",
                                       extra_state={"sneaky": Call(Global("os", "system"), f"touch {marker}")}))
  with pytest.raises(UnsafePickleError, match=r"os\.system"):
    load_edm_pickle(path)
  with pytest.raises(UnsafePickleError, match=r"os\.system"):
    load_teacher(path)
  # ... and a plain-pickle payload in place of the network.
  path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
  with pytest.raises(UnsafePickleError, match="system"):
    load_teacher(path)
  assert not marker.exists() and not (tmp_path / "src_marker").exists()


def test_mismatched_state_dict_is_rejected():
  config, state, _ = _load_fixture()
  with pytest.raises(ValueError, match="missing"):
    convert_state_dict(dict(config, num_blocks=2), state)
  with pytest.raises(ValueError, match="misshapen"):
    convert_state_dict(dict(config, label_dim=5), state)


def test_label_dropout_and_bad_inputs():
  """Label dropout draws from the 'dropout' rng in training only; NCHW inputs and missing labels
  of a conditional network give one-line errors."""
  net = DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, model_channels=16,
                     channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.0, label_dropout=1.0)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  noise, labels = jnp.zeros((2,)), jax.nn.one_hot(jnp.array([1, 2]), 4)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32),
                                     jax.eval_shape(net.init, jax.random.key(0), x, noise, labels))
  apply = jax.jit(net.apply, static_argnames="train")
  dropped = apply(variables, x, noise, labels, train=True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose(dropped, apply(variables, x, noise, jnp.zeros_like(labels)), atol=1e-5)
  assert np.abs(apply(variables, x, noise, labels) - dropped).max() > 1e-2
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(net.apply, variables, jnp.zeros((2, 3, 8, 8)), noise, labels)
  with pytest.raises(ValueError, match="class_labels"):
    jax.eval_shape(net.apply, variables, x, noise)


def test_imagenet64_config_has_sids_settings_and_validates_with_an_adm_pickle(tmp_path):
  """configs/imagenet64.py: SiD's ImageNet-64 settings; it validates against an EDM-format ADM pickle (no data
  set: FID against statistics by path) and refuses to start without the statistics."""
  from simjax import config_files  # pylint: disable=import-outside-toplevel
  from simjax.errors import UserError  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import image  # pylint: disable=import-outside-toplevel
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  config = config_files.load(REPO / "configs" / "imagenet64.py").get_config()
  assert (config.batch_size, config.optim.generator.lr, config.optim.fake.lr) == (8192, 4e-6, 4e-6)
  assert (config.optim.generator.b1, config.ema_half_life_images, config.loss.t_max, config.sigma_init) == (
      0.0, 2e6, 0.8, 2.5)
  assert abs(config.num_steps * config.batch_size - 500e6) < config.batch_size  # SiD's --duration 500 (Mimg)
  assert count_params(param_shapes(build_precond(image.image_teacher.teacher_arch_from_config(config)))) == (
      IMAGENET64_PARAMS)
  model_config, state, _ = _load_fixture()
  path = tmp_path / "edm-imagenet-tiny-cond-adm.pkl"
  path.write_bytes(_crafted_edm_pickle(model_config, state, tmp_path / "marker"))
  (tmp_path / "ref.npz").write_bytes(b"")
  config.teacher.checkpoint, config.data.shape, config.label_dim = str(path), (8, 8, 3), 10
  config.eval.batch_size = 8
  with pytest.raises(UserError, match="eval.fid_ref"):
    image.validate(config, "train")
  config.eval.fid_ref = str(tmp_path / "ref.npz")
  image.validate(config, "train")
  with pytest.raises(UserError, match="Inception weights not found"):
    image.validate(config, "train_and_eval")
  config.sample.classes = (3, 10)
  with pytest.raises(UserError, match=r"sample.classes=\(3, 10\)"):
    image.validate(config, "sample")
