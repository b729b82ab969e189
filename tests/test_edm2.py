"""EDM2's magnitude-preserving U-Net: parity with NVlabs/edm2's reference outputs (denoiser and uncertainty),
EDM2's parameter counts, forced weight normalisation, and EDM2's network pickles (training snapshots and
post-hoc EMA reconstructions, both float16) through the restricted reader."""
import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simjax import torch_files
from simjax.convert_edm import main as convert_main
from simjax.networks.edm2 import EDM2UNet, forced_weight_normalization, mp_normalize, weight_normalized
from simjax.networks.precond import EDM2Precond, build_precond, count_params, init_params, param_shapes
from simjax.teachers.edm2_latents import LatentNormalization, load_latent_codec, read_latent_normalization
from simjax.teachers.edm_checkpoints import convert_state_dict, load_teacher, read_edm_checkpoint
from simjax.torch_files import UnsafePickleError, load_edm_pickle, load_state_dict
from simjax.training.perf import configure_module

from conftest import FIXTURES  # tests/fixtures, in the repository
from test_edm_loading import Call, Global, NewDict, _crafted_module, _module_tree, craft, MODULE_SRC

FIXTURE = FIXTURES / "edm2_tiny_cond.npz"
HIGHEST = jax.lax.Precision.HIGHEST  # parity within 1e-4 also on GPUs, whose float32 default is TF32

# sum(p.numel() for p in net.parameters()) of NVlabs/edm2's own Precond(img_resolution=64, label_dim=1000,
# model_channels=C) on torch's meta device (NVlabs/edm2 commit 4bf8162; see tests/fixtures/README.md), for
# train_edm2.py's presets edm2-img512-xs (C 128) and -s (C 192), 4 latent channels: the paper's "125M", "280M".
EDM2_IMG512_XS_PARAMS = 124_713_253
EDM2_IMG512_S_PARAMS = 280_212_837
_RECONSTRUCT = Global("torch_utils.persistence", "_reconstruct_persistent_obj")


def _load_fixture():
  assert FIXTURE.is_file(), f"EDM2 reference fixture {FIXTURE} is missing: it is part of the repository (tests/fixtures)"
  with np.load(FIXTURE) as data:
    config = json.loads(str(data["config_json"]))
    state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
    inputs = {k: data[k] for k in data.files if not k.startswith("state/") and k != "config_json"}
  return config, state, inputs


def _nhwc(a):
  return a.transpose(0, 2, 3, 1)


def _denoise(arch, variables, inputs, cond="class_labels", return_logvar=False):
  module = build_precond(arch, precision=HIGHEST)
  labels = inputs["class_labels"] if cond == "class_labels" else None
  fn = jax.jit(lambda v, x, s, c: module.apply(v, x, s, c, return_logvar=return_logvar))
  return fn(variables, _nhwc(inputs["x_nchw"]), inputs["sigma"], labels)


def test_fixture_parity_denoiser_uncertainty_and_unconditional_query():
  """Converted EDM2 weights reproduce EDM2's own Precond: D(x, sigma, labels), logvar(sigma) and the
  unconditional query of the conditional network (EDM2: labels all zero), each within 1e-4."""
  config, state, inputs = _load_fixture()
  arch, variables = convert_state_dict(config, state)
  assert isinstance(build_precond(arch), EDM2Precond) and isinstance(build_precond(arch).model, EDM2UNet)
  out, logvar = _denoise(arch, variables, inputs, return_logvar=True)
  errors = {
      "D": np.abs(np.asarray(out) - _nhwc(inputs["denoised_nchw"])).max(),
      "logvar": np.abs(np.asarray(logvar).reshape(-1) - inputs["logvar"]).max(),
      "D uncond": np.abs(np.asarray(_denoise(arch, variables, inputs, cond=None))
                         - _nhwc(inputs["denoised_uncond_nchw"])).max(),
  }
  print("EDM2 parity vs NVlabs/edm2 (edm2_tiny_cond): " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
  assert out.dtype == jnp.float32 and logvar.shape == (5, 1, 1, 1)
  assert max(errors.values()) < 1e-4
  # The fixture exercises the paths that matter: the gains are non-zero, attention runs with 4 heads.
  assert np.abs(_nhwc(inputs["denoised_nchw"]) - inputs["x_nchw"].transpose(0, 2, 3, 1)).max() > 0.1


@pytest.mark.parametrize("corruption", ["flipped_kernels", "phases_as_freqs", "attention_heads_merged"])
def test_wrong_constructions_fail_parity(corruption):
  """The parity test can fail: 3x3 kernels converted without the spatial order, the Fourier buffers
  swapped, or attention run as one head (channels_per_head of the whole block) give errors far above 1e-4."""
  config, state, inputs = _load_fixture()
  arch, variables = convert_state_dict(config, state)
  if corruption == "flipped_kernels":
    flat = flax.traverse_util.flatten_dict(variables)
    flat = {p: (v[::-1, ::-1] if p[-1] == "kernel" and v.ndim == 4 and v.shape[0] == 3 else v)
            for p, v in flat.items()}
    variables = flax.traverse_util.unflatten_dict(flat)
  elif corruption == "phases_as_freqs":
    arch = dict(arch, emb_fourier_freqs=arch["emb_fourier_phases"], emb_fourier_phases=arch["emb_fourier_freqs"])
  else:
    arch = dict(arch, channels_per_head=32)
  out = _denoise(arch, variables, inputs)
  assert np.abs(np.asarray(out) - _nhwc(inputs["denoised_nchw"])).max() > 1e-2


def test_parameter_counts_match_edm2():
  for channels, expected in [(128, EDM2_IMG512_XS_PARAMS), (192, EDM2_IMG512_S_PARAMS)]:
    arch = dict(precond="EDM2Precond", img_resolution=64, img_channels=4, label_dim=1000, model_channels=channels)
    assert count_params(param_shapes(build_precond(arch))["params"]) == expected


def test_fresh_network_is_c_skip_x_and_keeps_its_path_through_perf_options():
  """A fresh EDM2 network (out_gain 0) is D = c_skip x, as EDM2's at initialisation; the compute-dtype and
  remat options reach the network under EDM2's attribute name 'unet'."""
  arch = dict(precond="EDM2Precond", img_resolution=8, img_channels=2, label_dim=3, model_channels=8,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
  module = build_precond(arch)
  variables = jax.jit(lambda key: init_params(module, key))(jax.random.key(0))
  assert set(variables["params"]) == {"unet", "logvar_linear"}
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  labels = jax.nn.one_hot(jnp.array([0, 2]), 3)
  sigma = jnp.array([0.5, 2.0])
  apply = jax.jit(module.apply)
  c_skip = (0.25 / (sigma**2 + 0.25))[:, None, None, None]
  np.testing.assert_allclose(apply(variables, x, sigma, labels), c_skip * x, rtol=1e-6)

  flat = flax.traverse_util.flatten_dict(variables)
  variables = flax.traverse_util.unflatten_dict(
      {p: (jnp.full_like(v, 0.7) if p[-1] in ("emb_gain", "out_gain") else v) for p, v in flat.items()})
  bf16 = configure_module(module, dtype=jnp.bfloat16, remat_blocks=True)
  assert bf16.unet.dtype == jnp.bfloat16 and bf16.unet.remat_blocks
  out, ref = jax.jit(bf16.apply)(variables, x, sigma, labels), apply(variables, x, sigma, labels)
  assert out.dtype == jnp.float32 and 0 < np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.1


def test_forced_weight_normalization():
  """The optax transform leaves every kernel at unit RMS per output unit after each step (EDM2 Eq. 66),
  touches nothing else, and the network's output does not depend on the kernels' scale."""
  config, state, inputs = _load_fixture()
  arch, variables = convert_state_dict(config, state)
  params = variables["params"]
  optimizer = optax.chain(optax.adam(1e-2), forced_weight_normalization())
  opt_state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(optimizer.update)(grads, opt_state, params)
  new = flax.traverse_util.flatten_dict(optax.apply_updates(params, updates))
  old = flax.traverse_util.flatten_dict(params)
  for path, value in new.items():
    axes = tuple(range(value.ndim - 1))
    rms = np.sqrt(np.mean(np.square(np.asarray(value)), axis=axes))
    if path[-1] == "kernel":
      np.testing.assert_allclose(rms, 1.0, rtol=1e-3, err_msg=str(path))  # 1 - eps / rms (EDM2's eps 1e-4)
    else:  # the scalar gains take Adam's plain step
      np.testing.assert_allclose(value, old[path] - 1e-2, rtol=1e-5, atol=1e-6, err_msg=str(path))
  with pytest.raises(ValueError, match="needs the parameters"):
    forced_weight_normalization().update(grads, optax.EmptyState())

  scaled = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 3.0 if p[-1].key == "kernel" else v, variables)
  out = _denoise(arch, scaled, inputs)
  ref = _denoise(arch, {"params": jax.jit(weight_normalized)(params)}, inputs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-3)  # up to EDM2's eps 1e-4
  np.testing.assert_allclose(np.asarray(mp_normalize(jnp.full((2, 3), 5.0), (1,))), 1.0, rtol=1e-4)


def _edm2_pickle(config, state, marker, *, dtype=np.float16, extra_encoder_state=None) -> bytes:
  """An EDM2 network pickle as NVlabs/edm2 writes it: EasyDict(encoder, dataset_kwargs, loss_fn, ema) with the
  network in float16 (training snapshots and post-hoc EMA reconstructions alike)."""
  kwargs = {k: v for k, v in config.items() if k != "precond"}  # Precond's recorded constructor kwargs
  ema = _crafted_module(_module_tree({k: v.astype(dtype) for k, v in state.items()}), (), kwargs, marker)
  ema.args[0]["class_name"] = "Precond"  # EDM2's preconditioner class (training.networks_edm2.Precond)
  scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])  # StabilityVAEEncoder's defaults
  encoder_state = dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
                       bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale, batch_size=8, _vae=None,
                       _init_args=(), _init_kwargs={})
  encoder_state.update(extra_encoder_state or {})
  encoder = Call(_RECONSTRUCT, dict(type="class", version=6, module_src=MODULE_SRC.format(marker=marker),
                                    class_name="StabilityVAEEncoder", state=encoder_state))
  loss_fn = Call(_RECONSTRUCT, dict(type="class", version=6, module_src=MODULE_SRC.format(marker=marker),
                                    class_name="EDM2Loss", state=dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5,
                                                                      _init_args=(), _init_kwargs={})))
  easydict = Global("dnnlib.util", "EasyDict")
  data = NewDict(easydict, dict(encoder=encoder, dataset_kwargs=NewDict(easydict, dict(
      class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip", use_labels=True)),
                                loss_fn=loss_fn, ema=ema))
  return craft(data)


@pytest.mark.parametrize("name", ["network-snapshot-2147483-0.100.pkl", "edm2-img512-xs-2147483-0.135.pkl"])
def test_edm2_pickle_loads_without_running_it(name, tmp_path):
  """A float16 EDM2 pickle -> load_teacher reproduces EDM2's outputs; its embedded source never runs."""
  config, state, inputs = _load_fixture()
  marker = tmp_path / "module_src_was_executed"
  path = tmp_path / name
  path.write_bytes(_edm2_pickle(config, state, marker))
  kwargs, loaded = load_edm_pickle(path)
  assert kwargs["precond"] == "EDM2Precond" and kwargs["model_channels"] == 16
  assert list(loaded) == list(state) and all(v.dtype == np.float16 for v in loaded.values())
  teacher = load_teacher(path, precision=HIGHEST)
  assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (8, 4, 10)
  out = teacher.denoise(_nhwc(inputs["x_nchw"]), inputs["sigma"], inputs["class_labels"])
  np.testing.assert_allclose(np.asarray(out), _nhwc(inputs["denoised_nchw"]), atol=1e-4, rtol=0)
  assert not marker.exists()
  # arch records the checkpoint's own buffers, so a converted directory needs no pickle to run.
  arch, _ = read_edm_checkpoint(path)
  assert arch["emb_fourier_phases"] == [float(v) for v in state["unet.emb_fourier.phases"]]


def test_payload_hidden_in_an_edm2_pickle_is_refused(tmp_path):
  config, state, _ = _load_fixture()
  marker = tmp_path / "pwned"
  path = tmp_path / "edm2.pkl"
  path.write_bytes(_edm2_pickle(config, state, tmp_path / "src", extra_encoder_state={
      "_vae": Call(Global("builtins", "exec"), f"open({str(marker)!r}, 'w').close()")}))
  with pytest.raises(UnsafePickleError, match=r"builtins\.exec"):
    load_edm_pickle(path)
  with pytest.raises(UnsafePickleError, match=r"builtins\.exec"):
    load_teacher(path)
  assert not marker.exists()


def test_edm2_state_dict_mismatches_are_named():
  config, state, _ = _load_fixture()
  with pytest.raises(ValueError, match="Fourier buffers"):
    convert_state_dict(config, {k: v for k, v in state.items() if not k.endswith("phases")})
  with pytest.raises(ValueError, match="missing 1 tensors .*out_gain"):
    convert_state_dict(config, {k: v for k, v in state.items() if k != "unet.out_gain"})
  with pytest.raises(ValueError, match="does not wrap SongUNet"):
    build_precond(dict(config, model_type="SongUNet"))
  assert load_state_dict(FIXTURE).keys() == state.keys()


def test_latent_normalization_from_the_pickle_and_converted_directory(tmp_path, monkeypatch):
  """An EDM2 pickle's StabilityVAEEncoder record gives EDM2's per-channel scale / bias (raw_mean / raw_std
  defaults); convert_edm carries it to latents.json; an EDM pickle has none."""
  config, state, _ = _load_fixture()
  path = tmp_path / "edm2.pkl"
  path.write_bytes(_edm2_pickle(config, state, tmp_path / "marker"))
  norm = read_latent_normalization(path)
  assert norm == LatentNormalization.from_stats(vae_name="stabilityai/sd-vae-ft-mse")
  np.testing.assert_allclose(norm.scale, 0.5 / np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
  # The teacher and convert_edm take it from their one read of the pickle (an XXL pickle is ~3 GB).
  reads = []
  real_read = torch_files._load_network_pickle  # pylint: disable=protected-access
  monkeypatch.setattr(torch_files, "_load_network_pickle", lambda p: reads.append(p) or real_read(p))
  assert load_teacher(path).latents == norm and len(reads) == 1
  out = tmp_path / "converted"
  assert convert_main([str(path), str(out)]) == 0 and len(reads) == 2
  assert read_latent_normalization(out) == norm and read_latent_normalization(out / "arch.json") is None
  assert load_teacher(out).latents == norm and len(reads) == 2
  with pytest.raises(ValueError, match="non-zero"):
    LatentNormalization((1.0, 0.0), (0.0, 0.0))
  # A record with other statistics gives those, not EDM2's defaults: the values are read, not assumed.
  scale, bias = np.float32([0.1, 0.2, 0.3, 0.4]), np.float32([-1.0, 0.5, 2.0, 0.25])
  other = tmp_path / "other.pkl"
  other.write_bytes(_edm2_pickle(config, state, tmp_path / "marker", extra_encoder_state={"scale": scale, "bias": bias}))
  read = read_latent_normalization(other)
  np.testing.assert_allclose(read.scale, scale)
  np.testing.assert_allclose(read.bias, bias)
  assert read != norm and load_teacher(other).latents == read


def test_latent_codec_matches_edm2s_encoder_on_a_diffusers_vae(tmp_path):
  """decode = EDM2's StabilityVAEEncoder.decode ((x - bias) / scale -> VAE decoder -> clamp to [0, 1]) mapped to
  [-1, 1], and encode = its posterior mean of [0, 1] pixels, normalised; on a random tiny diffusers VAE."""
  torch = pytest.importorskip("torch", reason="parity against diffusers needs torch (pip install -e '.[test]')")
  diffusers = pytest.importorskip("diffusers", reason="parity against diffusers needs diffusers")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                latent_channels=4).eval()
  with torch.no_grad():
    for p in vae.parameters():
      p.add_(0.05 * torch.randn(p.shape))  # off diffusers' zero/one initialisation
  vae.save_pretrained(tmp_path / "vae")
  norm = LatentNormalization.from_stats()
  codec = load_latent_codec(tmp_path / "vae", norm, precision=HIGHEST)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32) * 0.5
  pixels01 = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
  scale, bias = torch.tensor(norm.scale).reshape(1, -1, 1, 1), torch.tensor(norm.bias).reshape(1, -1, 1, 1)
  with torch.no_grad():
    raw = (torch.from_numpy(latents.transpose(0, 3, 1, 2)) - bias) / scale
    decoded = vae.decode(raw).sample.clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    mean = vae.encode(torch.from_numpy(pixels01.transpose(0, 3, 1, 2))).latent_dist.mean
    encoded = (mean * scale + bias).numpy().transpose(0, 2, 3, 1)
  errors = (np.abs((np.asarray(codec.decode(latents)) + 1) / 2 - decoded).max(),
            np.abs(np.asarray(codec.encode(pixels01 * 2 - 1)) - encoded).max())
  print(f"EDM2 latent codec vs EDM2's formulas on diffusers: decode {errors[0]:.3g}, encode {errors[1]:.3g}")
  assert max(errors) < 1e-4 and 0.01 < decoded.std()
  with pytest.raises(ValueError, match="latent channels"):
    load_latent_codec(tmp_path / "vae", LatentNormalization((1.0,) * 3, (0.0,) * 3))
