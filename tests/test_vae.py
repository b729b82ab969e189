"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL with every parameter random (float32,
a tiny two-block configuration, non-square images so an H/W mix-up shows), and the files load_vae reads:
save_pretrained folders (safetensors and .bin), pipeline roots, the pre-0.14 attention names with and
without 1x1-conv-shaped weights, the latent scaling, broken checkpoints and bfloat16 compute."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch", reason="parity against diffusers needs torch (pip install -e '.[test]')")
diffusers = pytest.importorskip("diffusers", reason="parity against diffusers needs diffusers (pip install -e '.[test]')")

import simjax  # pylint: disable=wrong-import-position
from simjax.networks.vae import AutoencoderKL  # pylint: disable=wrong-import-position
from simjax.teachers import vae_checkpoints as vc  # pylint: disable=wrong-import-position

TOL = 1e-4
HIGHEST = jax.lax.Precision.HIGHEST
SCALING, SHIFT = 0.37, 0.1  # not SD's, so a loader that ignored the config would be caught
TINY = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)


def _randomize(model, seed=0):
  """Every parameter random with outputs O(1): weights N(0, 1/fan_in), biases N(0, 0.3^2), GroupNorm
  scales 1 + N(0, 0.3^2) (diffusers initialises biases to zero and scales to one, which would hide them)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      else:
        p.copy_(noise * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
  return model.eval()


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def torch_vae():
  return _randomize(diffusers.AutoencoderKL(**TINY, scaling_factor=SCALING, shift_factor=SHIFT))


@pytest.fixture(scope="module")
def state(torch_vae):
  return {k: v.detach().numpy().copy() for k, v in torch_vae.state_dict().items()}


@pytest.fixture(scope="module")
def reference(torch_vae):
  """Images NHWC in [-1, 1] and diffusers' outputs for them, NHWC."""
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = torch_vae.encode(_nchw(images)).latent_dist
    latents = (posterior.mean - SHIFT) * SCALING
    round_trip = torch_vae.decode(latents / SCALING + SHIFT).sample
    decoded = torch_vae.decode(posterior.mean).sample
  return dict(images=images, mean=_nhwc(posterior.mean), logvar=_nhwc(posterior.logvar), decoded=_nhwc(decoded),
              latents=_nhwc(latents), round_trip=_nhwc(round_trip))


@pytest.fixture(scope="module")
def folders(torch_vae, tmp_path_factory):
  """{'safetensors': save_pretrained folder, 'bin': the same as a torch .bin, 'pipeline': a root with vae/}."""
  root = tmp_path_factory.mktemp("vae")
  torch_vae.save_pretrained(root / "safetensors")
  torch_vae.save_pretrained(root / "bin", safe_serialization=False)
  pipeline = root / "pipeline"
  torch_vae.save_pretrained(pipeline / "vae")
  (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
  return {"safetensors": root / "safetensors", "bin": root / "bin", "pipeline": pipeline}


def _flax(torch_vae, state, **kwargs):
  arch = vc.arch_from_config(dict(torch_vae.config))
  return AutoencoderKL(**arch, **kwargs), vc.convert_state_dict(arch, state)


def _write_folder(path, config, state):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path / "diffusion_pytorch_model.safetensors"))
  return path


def test_parameter_tree_mirrors_diffusers_names(torch_vae, state):
  _, variables = _flax(torch_vae, state)
  params = variables["params"]
  np.testing.assert_array_equal(params["decoder"]["up_blocks_0"]["resnets_1"]["conv2"]["kernel"],
                                state["decoder.up_blocks.0.resnets.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"],
                                state["encoder.mid_block.attentions.0.to_q.weight"].T)
  np.testing.assert_array_equal(params["encoder"]["mid_block"]["attentions_0"]["to_out_0"]["bias"],
                                state["encoder.mid_block.attentions.0.to_out.0.bias"])
  np.testing.assert_array_equal(params["encoder"]["down_blocks_0"]["resnets_0"]["norm1"]["scale"],
                                state["encoder.down_blocks.0.resnets.0.norm1.weight"])
  assert "conv_shortcut" in params["encoder"]["down_blocks_1"]["resnets_0"]  # 8 -> 16 channels
  assert "downsamplers_0" in params["encoder"]["down_blocks_0"] and "downsamplers_0" not in params["encoder"]["down_blocks_1"]
  assert len(jax.tree.leaves(params)) == len(state)


def test_moments_and_decode_match_diffusers(torch_vae, state, reference):
  module, variables = _flax(torch_vae, state, precision=HIGHEST)
  mean, logvar = jax.jit(lambda v, x: module.apply(v, x, method=module.encode_moments))(variables, reference["images"])
  decoded = jax.jit(lambda v, z: module.apply(v, z, method=module.decode_latents))(variables, reference["mean"])
  errors = {"mean": _err(mean, reference["mean"]), "logvar": _err(logvar, reference["logvar"]),
            "decode": _err(decoded, reference["decoded"])}
  print("max abs errors vs diffusers:", errors)
  assert mean.shape == (2, 8, 12, 4) and decoded.shape == (2, 16, 24, 3)
  assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("variant", [dict(mid_block_add_attention=False, use_quant_conv=False,
                                          use_post_quant_conv=False),
                                     dict(block_out_channels=(4, 8, 8), layers_per_block=2, norm_num_groups=2)])
def test_config_variants_match_diffusers(variant):
  """The switches and a deeper (3-block, 2-ResNet) layout build the tensors diffusers saves, and compute the same."""
  config = {**TINY, **variant}
  config["down_block_types"] = ("DownEncoderBlock2D",) * len(config["block_out_channels"])
  config["up_block_types"] = ("UpDecoderBlock2D",) * len(config["block_out_channels"])
  model = _randomize(diffusers.AutoencoderKL(**config), seed=1)
  module, variables = _flax(model, {k: v.detach().numpy() for k, v in model.state_dict().items()}, precision=HIGHEST)
  images = np.random.default_rng(1).uniform(-1, 1, (1, 8, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model.decode(model.encode(_nchw(images)).latent_dist.mean).sample
  got = jax.jit(lambda v, x: module.apply(v, x))(variables, images)
  err = _err(got, _nhwc(expected))
  print(f"max abs error vs diffusers, encode+decode {variant}: {err:.2e}")
  assert err <= TOL


def test_loader_reads_safetensors_bin_and_pipeline_root(folders, reference):
  vaes = {name: simjax.load_vae(path) for name, path in folders.items()}  # the public entry point
  for name, vae in vaes.items():
    assert (vae.scaling_factor, vae.shift_factor) == (SCALING, SHIFT), name
    assert vae.arch["block_out_channels"] == (8, 16)
    jax.tree.map(np.testing.assert_array_equal, vae.params, vaes["safetensors"].params)
  errors = {}
  for name, vae in vaes.items():
    errors[f"{name} encode"] = _err(vae.encode(reference["images"]), reference["latents"])
  errors["pipeline decode"] = _err(vaes["pipeline"].decode(reference["latents"]), reference["round_trip"])
  print("max abs errors vs diffusers:", errors)
  assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("conv_shaped", [False, True], ids=["old-names", "old-names-1x1-conv"])
def test_pre_014_attention_names_load_the_same(torch_vae, state, reference, tmp_path, conv_shaped):
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in state.items():
    for new_name, old_name in renames.items():
      if f".attentions.0.{new_name}." in key:
        key = key.replace(f".{new_name}.", f".{old_name}.")
        if conv_shaped and key.endswith("weight"):
          value = value[:, :, None, None]
    old[key] = value
  assert not any(".to_q." in k for k in old) and sum(".proj_attn." in k for k in old) == 4
  assert sum(v.ndim == 4 and v.shape[2:] == (1, 1) for k, v in old.items() if ".attentions." in k) == (8 if conv_shaped else 0)
  vae = vc.load_vae(_write_folder(tmp_path / "vae", dict(torch_vae.config), old))
  errors = {"encode": _err(vae.encode(reference["images"]), reference["latents"]),
            "decode": _err(vae.decode(reference["latents"]), reference["round_trip"])}
  print(f"max abs errors vs diffusers ({'1x1-conv' if conv_shaped else '2-D'} old names):", errors)
  assert max(errors.values()) <= TOL, errors


def test_scaling_round_trip_and_posterior_samples(folders, reference):
  vae = vc.load_vae(folders["safetensors"])
  latents = vae.encode(reference["images"])
  errors = {"encode": _err(latents, reference["latents"]),
            "decode(encode)": _err(vae.decode(latents), reference["round_trip"])}
  key = jax.random.key(3)
  sampled = vae.encode(reference["images"], key=key)
  noise = np.asarray(jax.random.normal(key, reference["mean"].shape))
  expected = (reference["mean"] + np.exp(0.5 * reference["logvar"]) * noise - SHIFT) * SCALING
  errors["sample"] = _err(sampled, expected)
  print("max abs errors vs diffusers' scaling:", errors)
  assert max(errors.values()) <= TOL, errors
  assert _err(sampled, latents) > 0.1  # the key does draw a sample


@pytest.mark.parametrize("damage, named", [
    ("drop", "decoder.conv_out.bias"),
    ("extra", "encoder.mid_block.attentions.0.to_z.weight"),
    ("shape", "encoder.conv_in.weight"),
    ("both-names", "decoder.mid_block.attentions.0.to_k.weight"),
])
def test_bad_checkpoint_names_the_tensor(torch_vae, state, tmp_path, damage, named):
  bad = dict(state)
  if damage == "drop":
    del bad[named]
  elif damage == "extra":
    bad[named] = np.zeros((16, 16), np.float32)
  elif damage == "shape":
    bad[named] = bad[named][:, :2]
  else:
    bad["decoder.mid_block.attentions.0.key.weight"] = bad[named]
  folder = _write_folder(tmp_path / "vae", dict(torch_vae.config), bad)
  with pytest.raises(vc.CheckpointMismatch, match=named.replace(".", r"\.")) as caught:
    vc.load_vae(folder)
  assert isinstance(caught.value, ValueError)
  print(caught.value)


@pytest.mark.parametrize("change, problem", [
    (dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")), "AttnDownEncoderBlock2D"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(norm_num_groups=3), "norm_num_groups=3"),
])
def test_unsupported_configs_are_refused(change, problem):
  with pytest.raises(ValueError, match=problem):
    vc.arch_from_config({**TINY, **change})


def test_bfloat16_compute_is_finite_and_near_float32(folders, reference):
  vae = vc.load_vae(folders["safetensors"], dtype=jnp.bfloat16)
  assert vae.module.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(vae.params))
  latents = vae.encode(reference["images"])
  images = vae.decode(reference["latents"])
  assert latents.dtype == jnp.float32 and images.dtype == jnp.float32
  assert np.isfinite(latents).all() and np.isfinite(images).all()
  errors = {"encode": _err(latents, reference["latents"]), "decode": _err(images, reference["round_trip"])}
  print("bf16 max abs errors vs diffusers float32:", errors)
  assert max(errors.values()) <= 0.1, errors  # bf16 keeps ~3 significant digits; outputs are O(1)
  assert min(errors.values()) > 10 * TOL, errors  # and the compute did run in bfloat16
