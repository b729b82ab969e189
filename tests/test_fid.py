"""FID: the Flax Inception port against pytorch-fid's features, and the Frechet distance maths.

No torch needed: the parity fixture's weights are rebuilt from an integer hash
(tests/fixtures/hashed_weights.py), and pool3 is compared with what pytorch-fid's own network
produced for the same weights and images.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simjax.errors import UserError
from simjax.eval import fid
from simjax.eval import inception

from conftest import FIXTURES  # tests/fixtures, in the repository

INCEPTION_FIXTURE = FIXTURES / "fid_inception_pool3.npz"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_hashed_weights_module():
  spec = importlib.util.spec_from_file_location("hashed_weights", FIXTURES / "hashed_weights.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def inception_fixture():
  hashed_weights = _load_hashed_weights_module()
  data = np.load(INCEPTION_FIXTURE)
  state = {}
  for index, (name, shape) in enumerate(json.loads(str(data["tensor_names_json"]))):
    stored = f"bn_stats/{name}"
    state[name] = (data[stored] if stored in data.files
                   else hashed_weights.fid_inception_weight(index, name, shape))
  return dict(state=state, images_nchw=data["images_nchw_01"], pool3=data["pool3"])


# ---------------------------------------------------------------------------------------------
# Inception.

def test_pool3_matches_pytorch_fid(inception_fixture):
  """Same weights, same 4 images: the Flax network reproduces pytorch-fid's pool3.

  Tolerance: max |err| <= 5e-4 with features up to 1.5, mean |err| <= 1e-4. This is float32
  rounding: with these random weights pytorch-fid's own float32 pool3 is 2.5e-4 (max) from the
  float64 result of the same graph, and a float64 run of this port matches torch's float64 run to
  3e-13. Measured here: max 1.0e-4, mean 3.4e-5. Structural slips are far outside the tolerance
  (counting padding in the average pools: 0.8; average instead of max pool in Mixed_7c: 2.9;
  BatchNorm eps 1e-5: 1.0).
  """
  variables = inception.inception_params_from_torch(inception_fixture["state"])
  images = np.transpose(inception_fixture["images_nchw"], (0, 2, 3, 1))  # NCHW -> NHWC
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  feature_fn = inception.make_inception_feature_fn(variables, mesh)  # -> inception_features
  features = np.asarray(feature_fn(images))
  expected = inception_fixture["pool3"]
  assert features.shape == (4, inception.POOL3_FEATURES) and features.dtype == np.float32
  error = np.abs(features - expected)
  assert error.max() <= 5e-4, f"max abs error {error.max():.3g}, features to {expected.max():.3g}"
  assert error.mean() <= 1e-4, f"mean abs error {error.mean():.3g}"
  # The features depend on the input (the fixture's BN statistics were calibrated for that).
  assert np.abs(features[0] - features[1]).max() > 1e-2


def test_converter_maps_layouts_and_rejects_wrong_states(inception_fixture):
  state = inception_fixture["state"]
  variables = inception.inception_params_from_torch(state)
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  np.testing.assert_array_equal(kernel, np.transpose(state["Mixed_6b.branch7x7_2.conv.weight"],
                                                     (2, 3, 1, 0)))
  assert kernel.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                state["Conv2d_1a_3x3.bn.running_var"])
  np.testing.assert_array_equal(variables["params"]["Mixed_7c"]["branch_pool"]["bn"]["scale"],
                                state["Mixed_7c.branch_pool.bn.weight"])
  assert "fc" not in variables["params"]

  incomplete = {k: v for k, v in state.items() if k != "Mixed_5d.branch_pool.bn.running_var"}
  with pytest.raises(ValueError, match="lacks 1 of"):
    inception.inception_params_from_torch(incomplete)
  wrong_shape = dict(state, **{"Mixed_5b.branch1x1.conv.weight": np.zeros((64, 192, 3, 3))})
  with pytest.raises(ValueError, match="Mixed_5b.branch1x1.conv.weight"):
    inception.inception_params_from_torch(wrong_shape)
  with pytest.raises(ValueError, match="Unexpected tensor"):
    inception.inception_params_from_torch(dict(state, **{"AuxLogits.fc.weight": np.zeros(3)}))


def _half_pixel_bilinear_matrix(in_size, out_size):
  """Interpolation matrix of torch's bilinear resize with align_corners=False (no antialias)."""
  source = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
  lower = np.minimum(np.floor(source).astype(int), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = source - lower
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.arange(out_size), lower), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), upper), frac)
  return matrix


@pytest.mark.parametrize("size", [32, 512])
def test_resize_is_torch_bilinear_align_corners_false(size):
  """Up- (32) and down-sampling (512, where antialiasing would differ) to 299x299.

  Tolerance: float32 source coordinates are off by ~size * 2^-24, which moves values by up to
  ~size * 6e-8 (torch's float32 resize shows the same error).
  """
  images = np.random.default_rng(size).random((2, size, size + 3, 3)).astype(np.float32)
  resized = np.asarray(inception.resize_for_inception(images))
  rows = _half_pixel_bilinear_matrix(size, 299)
  cols = _half_pixel_bilinear_matrix(size + 3, 299)
  expected = np.einsum("ph,nhwc->npwc", rows, images.astype(np.float64))
  expected = np.einsum("qw,npwc->npqc", cols, expected)
  np.testing.assert_allclose(resized, expected, atol=1e-7 * size + 1e-6)


@pytest.mark.parametrize("size", [32, 512])
def test_resize_matches_torch_interpolate(size):
  torch = pytest.importorskip("torch", reason="optional cross-check against torch itself")
  images = np.random.default_rng(0).random((2, 3, size, size)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(images), size=(299, 299),
                                             mode="bilinear", align_corners=False).numpy()
  resized = np.asarray(inception.resize_for_inception(images.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(resized.transpose(0, 3, 1, 2), expected, atol=1e-6)


def test_images_are_checked_and_uint8_is_rescaled():
  as_float = inception._images_to_unit_float(jnp.array([[[[0, 255, 51]]]], jnp.uint8))
  np.testing.assert_allclose(as_float, [[[[0.0, 1.0, 0.2]]]], atol=1e-7)
  with pytest.raises(ValueError, match="NHWC RGB"):
    inception.inception_features({}, np.zeros((2, 3, 32, 32), np.float32))


@pytest.mark.parametrize("path", ["/nonexistent/pt_inception.pth", None])
def test_missing_weights_path_is_a_one_line_error(path):
  with pytest.raises(ValueError) as error:
    inception.load_fid_inception(path)
  message = str(error.value)
  assert "\n" not in message
  assert inception.FID_WEIGHTS_FILENAME in message and inception.FID_WEIGHTS_URL in message
  assert "eval.inception_path" in message
  assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, UserError)


def test_load_fid_inception_reads_a_pth(inception_fixture, tmp_path):
  torch = pytest.importorskip("torch", reason="writing a .pth needs torch (optional)")
  pytest.importorskip("simjax.torch_files", reason="simjax.torch_files not available yet")
  path = tmp_path / inception.FID_WEIGHTS_FILENAME
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in inception_fixture["state"].items()},
             path)
  loaded = inception.load_fid_inception(path)
  expected = inception.inception_params_from_torch(inception_fixture["state"])
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


# ---------------------------------------------------------------------------------------------
# Frechet distance.

def _random_covariance(rng, dim, rank=None):
  factor = rng.normal(size=(dim, rank or 2 * dim))
  return factor @ factor.T / factor.shape[1]


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_a_set_with_itself_is_zero(method):
  features = np.random.default_rng(0).normal(size=(500, 16)) * 3.0 + 1.0
  mu, sigma = fid.feature_statistics(features)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9 * np.trace(sigma)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_a_mean_shift_is_its_squared_norm(method):
  rng = np.random.default_rng(1)
  sigma = _random_covariance(rng, 12)
  mu1, shift = rng.normal(size=12), rng.normal(size=12)
  for scale in (0.0, 0.5, 2.0):
    distance = fid.frechet_distance(mu1, sigma, mu1 + scale * shift, sigma, method=method)
    np.testing.assert_allclose(distance, scale**2 * shift @ shift, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_closed_form_for_diagonal_covariances(method):
  # Commuting covariances: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(2)
  a, b = rng.uniform(0.1, 4.0, size=10), rng.uniform(0.1, 4.0, size=10)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  distance = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
  np.testing.assert_allclose(distance, expected, rtol=1e-10)
  # Rotating both Gaussians by one orthogonal matrix leaves the distance unchanged, and makes
  # the covariances dense so that the matrix square root does real work.
  rotation = np.linalg.qr(rng.normal(size=(10, 10)))[0]
  rotated = fid.frechet_distance(rotation @ mu1, rotation @ np.diag(a) @ rotation.T,
                                 rotation @ mu2, rotation @ np.diag(b) @ rotation.T, method=method)
  np.testing.assert_allclose(rotated, expected, rtol=1e-8)


def test_sqrtm_and_eigh_agree_including_singular_covariances():
  rng = np.random.default_rng(3)
  for rank in (None, 5):  # rank 5 < dim 20: as with fewer samples than feature dimensions
    sigma1, sigma2 = _random_covariance(rng, 20, rank), _random_covariance(rng, 20, rank)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    by_sqrtm = fid.frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm")
    by_eigh = fid.frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh")
    np.testing.assert_allclose(by_sqrtm, by_eigh, rtol=1e-6)
    assert by_eigh > 0


def test_singular_product_falls_back_to_an_eps_offset(monkeypatch):
  calls = []

  def sqrtm_failing_once(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else fid._psd_sqrt(matrix)

  monkeypatch.setattr(fid, "_matrix_sqrt", sqrtm_failing_once)
  sigma = np.diag([1.0, 4.0])
  distance = fid.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma, eps=1e-3)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (sigma + 1e-3 * np.eye(2)) @ (sigma + 1e-3 * np.eye(2)))
  np.testing.assert_allclose(distance, -4e-3, atol=1e-12)  # 2 Tr(sigma) - 2 Tr(sigma + eps I)


def test_frechet_distance_rejects_bad_shapes():
  with pytest.raises(ValueError, match="feature dimensions differ"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="mu \\[D\\] and sigma \\[D, D\\]"):
    fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="unknown method"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


# ---------------------------------------------------------------------------------------------
# Statistics.

def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
  features = np.random.default_rng(4).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = fid.feature_statistics(features)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError, match="N >= 2"):
    fid.feature_statistics(features[:1])


def test_streamed_moments_are_exact_with_a_large_mean():
  # Features far from the origin: naive sum-of-squares in float64 would lose ~8 digits here.
  features = 1e4 + np.random.default_rng(5).normal(size=(1000, 4))
  moments = fid.FeatureMoments()
  for chunk in np.array_split(features, 7):
    moments.add(chunk)
  mu, sigma = moments.statistics()
  expected_mu, expected_sigma = fid.feature_statistics(features)
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-14)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12)


def _toy_feature_fn(trace_log):
  """A jitted nonlinear feature map in which an all-zero (padding) image gives nonzero features."""
  projection = jnp.asarray(np.random.default_rng(6).normal(size=(2 * 3 * 3, 5)))

  @jax.jit
  def feature_fn(images):
    trace_log.append(images.shape)
    return jnp.tanh(images.reshape(images.shape[0], -1) @ projection) + 1.0

  def numpy_feature_fn(images):
    return np.tanh(images.reshape(len(images), -1) @ np.asarray(projection, np.float64)) + 1.0

  return feature_fn, numpy_feature_fn


def test_compute_fid_stats_streams_and_masks_padding():
  traces = []
  feature_fn, numpy_feature_fn = _toy_feature_fn(traces)
  images = np.random.default_rng(7).normal(size=(23, 2, 3, 3)).astype(np.float32)
  # Uneven input batches, re-chunked to 8 + 8 + 7 (the last one padded by 1 row of zeros).
  batches = [images[:5], images[5:12], jnp.asarray(images[12:20]), images[20:]]
  mu, sigma = fid.compute_fid_stats(feature_fn, batches, batch_size=8)
  expected_mu, expected_sigma = fid.feature_statistics(numpy_feature_fn(images.astype(np.float64)))
  np.testing.assert_allclose(mu, expected_mu, atol=1e-6)
  np.testing.assert_allclose(sigma, expected_sigma, atol=1e-6)
  assert traces == [(8, 2, 3, 3)]  # one fixed batch shape: compiled once

  # Unmasked padding would move the statistics: prove the check above can fail.
  padded = np.concatenate([images, np.zeros((1, 2, 3, 3), np.float32)])
  leaked_mu, _ = fid.feature_statistics(numpy_feature_fn(padded.astype(np.float64)))
  assert np.abs(leaked_mu - expected_mu).max() > 1e-3


def test_compute_fid_stats_takes_num_samples_from_an_endless_stream():
  traces = []
  feature_fn, numpy_feature_fn = _toy_feature_fn(traces)
  rng = np.random.default_rng(8)
  drawn = []

  def endless():
    while True:
      drawn.append(rng.normal(size=(6, 2, 3, 3)).astype(np.float32))
      yield drawn[-1]

  mu, sigma = fid.compute_fid_stats(feature_fn, endless(), batch_size=4, num_samples=15)
  assert len(drawn) == 3  # 6 + 6 + 3 of the third; no batch drawn beyond the 15th sample
  used = np.concatenate(drawn)[:15].astype(np.float64)
  expected_mu, expected_sigma = fid.feature_statistics(numpy_feature_fn(used))
  np.testing.assert_allclose(mu, expected_mu, atol=1e-6)
  np.testing.assert_allclose(sigma, expected_sigma, atol=1e-6)
  with pytest.raises(ValueError, match="ran out after 12 samples"):
    fid.compute_fid_stats(feature_fn, [np.zeros((12, 2, 3, 3))], batch_size=4, num_samples=20)


def test_compute_fid_stats_on_a_mesh_and_mesh_errors():
  traces = []
  feature_fn, numpy_feature_fn = _toy_feature_fn(traces)
  images = np.random.default_rng(9).normal(size=(10, 2, 3, 3)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch_size = 4 * len(jax.devices())
  mu, sigma = fid.compute_fid_stats(feature_fn, [images], batch_size=batch_size, mesh=mesh)
  expected_mu, expected_sigma = fid.feature_statistics(numpy_feature_fn(images.astype(np.float64)))
  np.testing.assert_allclose(mu, expected_mu, atol=1e-6)
  np.testing.assert_allclose(sigma, expected_sigma, atol=1e-6)
  other_axis = jax.sharding.Mesh(np.array(jax.devices()), ("model",))
  with pytest.raises(ValueError, match="no 'data' axis"):
    fid.compute_fid_stats(feature_fn, [images], batch_size=4, mesh=other_axis)


def test_compute_fid_stats_takes_pytree_batches_and_returns_aligned_outputs():
  traces = []
  feature_fn, numpy_feature_fn = _toy_feature_fn(traces)
  rng = np.random.default_rng(11)
  images = rng.normal(size=(11, 2, 3, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=11).astype(np.int32)

  def with_outputs(batch):  # the label travels with its image; a per-row output computed from the image
    return feature_fn(batch["x"]), {"label": batch["labels"], "sign": jnp.sign(batch["x"][:, 0, 0, 0])}

  seen = []
  batches = [{"x": images[:3], "labels": labels[:3]}, {"x": images[3:], "labels": labels[3:]}]
  mu, sigma, outputs = fid.compute_fid_stats(with_outputs, batches, batch_size=4, return_outputs=True,
                                             progress=lambda done, rows: seen.append((done, rows)))
  expected_mu, expected_sigma = fid.feature_statistics(numpy_feature_fn(images.astype(np.float64)))
  np.testing.assert_allclose(mu, expected_mu, atol=1e-6)
  np.testing.assert_allclose(sigma, expected_sigma, atol=1e-6)
  np.testing.assert_array_equal(outputs["label"], labels)  # padding rows dropped, order kept
  np.testing.assert_array_equal(outputs["sign"], np.sign(images[:, 0, 0, 0]))
  assert seen == [(1, 4), (2, 8), (3, 11)]
  # Processes with fewer samples pad with empty batches up to the agreed count.
  chunks = list(fid._fixed_size_batches([images[:5]], 4, 5, min_batches=4))  # pylint: disable=protected-access
  assert [n for _, n in chunks] == [4, 1, 0, 0] and all(b.shape == (4, 2, 3, 3) for b, _ in chunks)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np, jax.numpy as jnp
    from simjax.eval import fid
    projection = jnp.asarray(np.random.default_rng(0).normal(size=(12, 5)))
    shard_counts = []
    @jax.jit
    def jitted(images):
      return jnp.tanh(images.reshape(images.shape[0], -1) @ projection)
    def feature_fn(images):
      shard_counts.append(len({str(shard.index) for shard in images.addressable_shards}))
      return jitted(images)
    from simjax.parallel.mesh import make_mesh
    images = np.random.default_rng(1).normal(size=(30, 12)).astype(np.float32)
    ref_mu, ref_sigma = fid.feature_statistics(
        np.tanh(images.astype(np.float64) @ np.asarray(projection)))
    data_only = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    for mesh in (data_only, make_mesh((2, 2))):  # ('data',) and ('data', 'fsdp')
      shard_counts.clear()
      mu, sigma = fid.compute_fid_stats(feature_fn, [images[:13], images[13:]], batch_size=8,
                                        mesh=mesh)
      # 8 + 8 + 8 + 6 (padded): every batch split into 4 distinct slices, one per device.
      assert shard_counts == [4] * 4, shard_counts
      np.testing.assert_allclose(mu, ref_mu, atol=1e-6)
      np.testing.assert_allclose(sigma, ref_sigma, atol=1e-6)
    try:
      fid.compute_fid_stats(feature_fn, [images], batch_size=6, mesh=mesh)
      raise SystemExit("batch 6 over 4 devices was accepted")
    except ValueError as error:
      assert "multiple of 4" in str(error), error
    print("OK")
""")


def test_compute_fid_stats_shards_over_four_cpu_devices():
  """4 fake CPU devices (a fresh process, since the device count is fixed at JAX start-up)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                  os.environ.get("PYTHONPATH")])),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Reference statistics files.

def test_reference_stats_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(10)
  mu, sigma = rng.normal(size=7), _random_covariance(rng, 7)
  path = tmp_path / "refs" / "toy.npz"
  fid.save_reference_stats(path, mu, sigma)
  loaded_mu, loaded_sigma = fid.load_reference_stats(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  assert set(np.load(path).files) == {"mu", "sigma"}  # EDM's fid-refs layout

  with pytest.raises(ValueError, match="not found"):
    fid.load_reference_stats(tmp_path / "missing.npz")
  np.savez(tmp_path / "no_sigma.npz", mu=mu)
  with pytest.raises(ValueError, match="need keys 'mu' and 'sigma'"):
    fid.load_reference_stats(tmp_path / "no_sigma.npz")
  (tmp_path / "junk.npz").write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="not a readable .npz"):
    fid.load_reference_stats(tmp_path / "junk.npz")
  np.savez(tmp_path / "bad_shape.npz", mu=mu, sigma=sigma[:3])
  with pytest.raises(ValueError, match="expected mu \\[D\\] and sigma \\[D, D\\]"):
    fid.load_reference_stats(tmp_path / "bad_shape.npz")
  with pytest.raises(ValueError, match="save_reference_stats needs"):
    fid.save_reference_stats(tmp_path / "x.npz", mu, sigma[:3])


def test_edm2_dataset_refs_pickle_is_read_without_running_it(tmp_path):
  """EDM2 publishes its reference statistics as a pickle ({'fid': {'mu', 'sigma'}, 'fd_dinov2': ...}): read
  through the restricted unpickler, so a payload in such a file is refused and never runs."""
  import os  # pylint: disable=import-outside-toplevel
  import pickle  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(11)
  mu, sigma = rng.normal(size=5), _random_covariance(rng, 5)
  path = tmp_path / "img512.pkl"
  path.write_bytes(pickle.dumps(dict(fid=dict(mu=mu, sigma=sigma), fd_dinov2=dict(mu=mu[:2], sigma=sigma[:2, :2]))))
  loaded_mu, loaded_sigma = fid.load_reference_stats(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)

  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)
  path.write_bytes(pickle.dumps(dict(fid=dict(mu=mu, sigma=Evil()))))
  with pytest.raises(ValueError, match="system"):
    fid.load_reference_stats(path)
  assert not marker.exists()
