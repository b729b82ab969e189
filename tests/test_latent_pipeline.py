"""The image pipeline on an EDM2 latent teacher (configs/edm2_img512.py's path) with tiny sizes: a float16
EDM2 pickle with its StabilityVAEEncoder record, a tiny VAE folder, no data set (data.name 'none').

The default suite trains a few SIM steps (forced weight normalisation on, sample grids decoded through the
VAE, the exported generator carrying latents.json) and samples class-conditionally from the generator; the
slow test adds the final evaluation (FID Inception on decoded samples against statistics given by path).
Everything is made here without torch: the VAE folder from simjax's own AutoencoderKL, the Inception
weights from tests/fixtures/hashed_weights.py.
"""
import importlib.util
import json
import subprocess
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import simjax
from simjax.networks.vae import AutoencoderKL
from simjax.teachers import vae_checkpoints as vc
from simjax.teachers.edm2_latents import LatentNormalization, read_latent_normalization

from conftest import FIXTURES, REPO
from test_edm2 import _edm2_pickle, _load_fixture

TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)
STEPS = 3


def _write_vae_folder(path):
  """A diffusers-format AutoencoderKL folder (config.json + safetensors) of simjax's VAE with random weights."""
  arch = vc.arch_from_config(dict(TINY_VAE, _class_name="AutoencoderKL"))
  shapes = jax.eval_shape(lambda: AutoencoderKL(**arch).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  rng = np.random.default_rng(0)
  state = {}
  for leaf_path, leaf in flax.traverse_util.flatten_dict(shapes["params"]).items():
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    value = (rng.standard_normal(leaf.shape) / np.sqrt(fan_in) + (leaf_path[-1] == "scale")).astype(np.float32)
    if leaf_path[-1] == "kernel":  # flax HWIO / [in, out] -> torch OIHW / [out, in]
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state[vc._torch_name(leaf_path)] = np.ascontiguousarray(value)  # pylint: disable=protected-access
  path.mkdir()
  (path / "config.json").write_text(json.dumps(dict(TINY_VAE, _class_name="AutoencoderKL", scaling_factor=0.18215)))
  save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
  return path


def _main(workdir, *args, check=True):
  cmd = [sys.executable, "-m", "simjax.main", "--config=configs/edm2_img512.py", f"--workdir={workdir}"] + list(args)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("edm2_assets")
  config, state, _ = _load_fixture()
  teacher = root / "edm2-img512-tiny-0000001-0.100.pkl"
  teacher.write_bytes(_edm2_pickle(config, state, root / "module_src_ran"))
  fid_ref = root / "img512.npz"
  np.savez(fid_ref, mu=np.zeros(2048), sigma=np.eye(2048))
  tiny = [f"--config.teacher.checkpoint={teacher}", f"--config.vae={_write_vae_folder(root / 'vae')}",
          "--config.label_dim=10", "--config.batch_size=4",
          f"--config.eval.fid_ref={fid_ref}", "--config.eval.batch_size=8", "--config.eval.num_samples=8",
          "--config.eval.teacher_steps=2", "--config.eval.num_classes=10", "--config.log_every=1",
          "--config.checkpoint_every=2", "--config.grid_every=2", "--config.grid_size=2", "--config.eval.every=0"]
  return dict(root=root, teacher=teacher, tiny=tiny, marker=root / "module_src_ran")


SHAPE = "--config.data.shape=(8, 8, 4)"


def test_latent_distillation_decodes_grids_and_samples(assets, tmp_path):
  wd = tmp_path / "run"
  proc = _main(wd, *assets["tiny"], SHAPE, "--mode=train", f"--config.num_steps={STEPS}")
  assert not assets["marker"].exists()
  metrics = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert metrics and all(np.isfinite(m["gen_loss"]) for m in metrics if "gen_loss" in m), proc.stdout[-2000:]
  # configs/edm2_img512.py weights the losses by the fake score's EDM2 uncertainty (SiD's --return_logvar 1).
  assert all(np.isfinite(m["fake_logvar"]) for m in metrics if "gen_loss" in m), metrics
  # The grid shows decoded 16 x 16 RGB images (the VAE's 2x), not the 8 x 8 x 4 latents.
  grid = Image.open(sorted((wd / "samples").glob("grid_step*.png"))[-1])
  assert grid.mode == "RGB" and grid.width >= 2 * 16
  # The exported generator carries the teacher's latent normalisation.
  assert read_latent_normalization(wd / "generator") == LatentNormalization.from_stats(
      vae_name="stabilityai/sd-vae-ft-mse")
  arch = json.loads((wd / "generator" / "arch.json").read_text())
  assert arch["precond"] == "EDM2Precond" and len(arch["emb_fourier_freqs"]) == 16

  _main(wd, *assets["tiny"], SHAPE, "--mode=sample", "--config.sample.num=20", "--config.sample.classes=(3, 7)",
        f"--config.num_steps={STEPS}")
  with np.load(wd / "samples" / "sample_generator.npz") as data:
    x, labels = data["x"], data["labels"]
  assert x.shape == (20, 8, 8, 4) and labels.shape == (20, 10)  # latents (the data's layout), one-hot labels
  np.testing.assert_array_equal(labels.argmax(-1), [3, 7] * 10)  # the chosen classes in turn
  assert np.all(np.isfinite(x))
  generator = simjax.load_generator(wd)  # latents come back unclipped (EDM2's latents are not in [-1, 1])
  assert generator.latent and json.loads((wd / "generator" / "generator.json").read_text())["latent"]
  assert Image.open(wd / "samples" / "sample_generator.png").mode == "RGB"


@pytest.mark.parametrize("bad, problem", [
    (["--config.vae=/nonexistent/vae", SHAPE], "VAE '/nonexistent/vae' not found"),
    (["--config.data.shape=(8, 8, 3)"], "has channels 4 but the config expects 3"),
    (["--config.eval.fid_ref=", SHAPE], "data.name='none'"),
    (["--config.data.name=imagenet", SHAPE], "unknown data.name 'imagenet'"),
    (["--config.sample.classes=(3, 12)", SHAPE], "sample.classes=(3, 12) must be class indices in [0, 10)"),
])
def test_bad_latent_configs_exit_2_before_writing(assets, tmp_path, bad, problem):
  wd = tmp_path / "bad"
  proc = _main(wd, *assets["tiny"], *bad, "--config.num_steps=1", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert problem in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not wd.exists()


def test_evaluation_features_see_decoded_images(assets, monkeypatch):
  """The default suite's check that evaluation decodes before features (the slow test runs FID end to end):
  make_features on a latent config feeds the feature space codec.decode(latents), 16 x 16 RGB in [-1, 1]
  from the pickle's latent normalisation, never the 8 x 8 x 4 latents."""
  from simjax import config_files  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import image_eval  # pylint: disable=import-outside-toplevel
  seen = []

  class RecordingFeatures:  # stands in for the FID Inception (same constructor and fn contract)
    has_classes = False

    def __init__(self, config, mesh):
      del config, mesh
      self.fn = lambda images: (seen.append(images.shape) or jnp.concatenate(
          [jnp.mean(images, axis=(1, 2)), jnp.std(images, axis=(1, 2))], axis=-1), None)

  monkeypatch.setattr(image_eval, "InceptionFeatures", RecordingFeatures)
  config = config_files.load(REPO / "configs" / "edm2_img512.py").get_config(str(assets["teacher"]))
  config.vae = str(assets["root"] / "vae")
  features = image_eval.make_features(config, None, None, None)
  assert isinstance(features, image_eval.DecodedFeatures)
  latents = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32) * 0.5
  feats, classes = features.fn(latents)
  images = np.asarray(image_eval.latent_codec(config).decode(latents))
  assert seen == [(2, 16, 16, 3)] and classes is None
  assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.01
  np.testing.assert_allclose(np.asarray(feats), np.concatenate([images.mean((1, 2)), images.std((1, 2))], -1),
                             atol=1e-5)
  assert read_latent_normalization(assets["teacher"]) == image_eval.latent_codec(config).norm


def _hashed_inception(path):
  spec = importlib.util.spec_from_file_location("hashed_weights", FIXTURES / "hashed_weights.py")
  hashed = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hashed)
  with np.load(FIXTURES / "fid_inception_pool3.npz") as data:
    names = json.loads(str(data["tensor_names_json"]))
    stats = {k: data[k] for k in data.files if k.startswith("bn_stats/")}
  state = {name: stats.get(f"bn_stats/{name}", None) for name, _ in names}
  for index, (name, shape) in enumerate(names):
    if state[name] is None:
      state[name] = hashed.fid_inception_weight(index, name, shape)
  np.savez(path, **{f"state/{k}": v for k, v in state.items()})
  return path


@pytest.mark.slow
def test_latent_evaluation_decodes_before_fid(assets, tmp_path):
  inception = _hashed_inception(tmp_path / "inception.npz")
  wd = tmp_path / "run"
  _main(wd, *assets["tiny"], SHAPE, f"--config.eval.inception_path={inception}", "--config.num_steps=2")
  final = json.loads((wd / "eval" / "final.json").read_text())
  assert set(final) == {"generator", "teacher"}  # no data set: no held-out reference row
  assert all(np.isfinite(final[s]["frechet_distance"]) for s in final)
  with np.load(wd / "samples" / "generator.npz") as data:
    assert data["x"].shape == (8, 8, 8, 4)
