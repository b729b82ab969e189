"""Frechet distance between feature distributions, and streaming feature statistics.

FID (Heusel et al. 2017, section 4, eq. 6) fits a Gaussian to the features of each sample set and
reports their Frechet (2-Wasserstein) distance

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)).

Nothing here is specific to Inception: any feature map works (the digits pipeline uses a small
classifier's features). With Inception pool3 features (`simjax.eval.inception`) and reference
statistics in EDM's fid-refs format (`.npz` with `mu`, `sigma`), the number is the published FID.

Statistics are accumulated on the host in float64 as sums and sums of outer products, so 50,000
samples never sit in memory at once; feature extraction can be sharded over a mesh's 'data' axis.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from simjax import storage
from simjax.errors import UserError
from simjax.parallel.mesh import BATCH_AXES, DATA

# EDM publishes reference statistics for its datasets here (e.g. cifar10-32x32.npz).
EDM_FID_REFS_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"


# ---------------------------------------------------------------------------------------------
# The distance.

def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f"Frechet distance: {which} needs mu [D] and sigma [D, D], got mu "
                     f"{mu.shape} and sigma {sigma.shape}; pass feature_statistics(features).")


def _matrix_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Principal square root of a (generally non-symmetric) matrix, by scipy's Schur method."""
  import scipy.linalg  # pylint: disable=import-outside-toplevel
  root = scipy.linalg.sqrtm(matrix)
  return root[0] if isinstance(root, tuple) else root  # old scipy with disp=False


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
  """Tr (Sigma_1 Sigma_2)^(1/2) exactly as pytorch-fid and EDM compute it (scipy sqrtm)."""
  covmean = _matrix_sqrt(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # The product is (near) singular, e.g. fewer samples than feature dimensions.
    logging.warning("Frechet distance: singular covariance product; adding %g to the diagonals "
                    "of both covariances.", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _matrix_sqrt((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Rounding gives a tiny imaginary part; a large one means the inputs are not covariances.
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise UserError(f"Frechet distance: sqrt(Sigma_1 Sigma_2) has an imaginary part of "
                       f"{np.abs(covmean.imag).max():.3g}; pass symmetric positive semi-definite "
                       "covariances (or method='eigh').")
    covmean = covmean.real
  return np.trace(covmean)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def _trace_sqrt_product_eigh(sigma1, sigma2):
  """Tr (Sigma_1 Sigma_2)^(1/2) = Tr (S_1^(1/2) Sigma_2 S_1^(1/2))^(1/2), a symmetric PSD problem.

  Sigma_1 Sigma_2 is similar to S_1^(1/2) Sigma_2 S_1^(1/2), so they share eigenvalues; the latter
  is symmetric, so its eigenvalues are real and a singular product needs no offset.
  """
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  return np.sqrt(np.clip(eigenvalues, 0, None)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6,
                     method: str = "sqrtm") -> float:
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr (sigma1 sigma2)^(1/2)
  (Heusel et al. 2017, eq. 6; Dowson & Landau 1982).

  method='sqrtm' (default) follows pytorch-fid and EDM, so numbers are comparable with published
  FIDs: scipy's sqrtm of the product; if that is not finite, retry with `eps` added to both
  diagonals; drop a negligible imaginary part. method='eigh' uses the symmetric form
  Tr (S1^(1/2) sigma2 S1^(1/2))^(1/2), which is stable for singular covariances (fewer samples
  than dimensions) and faster.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  _check_gaussian(mu1, sigma1, "the first distribution")
  _check_gaussian(mu2, sigma2, "the second distribution")
  if mu1.shape != mu2.shape:
    raise UserError(f"Frechet distance: the feature dimensions differ ({mu1.shape[0]} vs "
                     f"{mu2.shape[0]}); compute both statistics with the same feature network.")
  if method == "sqrtm":
    trace_sqrt = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == "eigh":
    trace_sqrt = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise UserError(f"Frechet distance: unknown method {method!r}; use 'sqrtm' or 'eigh'.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ---------------------------------------------------------------------------------------------
# Statistics.

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], unbiased covariance [D, D]) of features [N, D], in float64 (as np.cov)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise UserError(f"feature_statistics needs features [N, D] with N >= 2, got shape "
                     f"{features.shape}; pass at least two samples' features.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


class FeatureMoments:
  """Running count, sum and sum of outer products of features, in float64.

  Sums are taken about a fixed shift (the first batch's mean), so the covariance
  (sum x x^T - n mu mu^T) / (n - 1) does not lose digits to cancellation when |mu| >> std.
  """

  def __init__(self):
    self.count = 0
    self.shift = None
    self.total = None
    self.total_outer = None

  def add(self, features) -> None:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise UserError(f"FeatureMoments.add needs features [N, D], got shape {features.shape}; "
                       "flatten each sample's features to a vector.")
    if features.shape[0] == 0:
      return
    if self.shift is None:
      dim = features.shape[1]
      self.shift = features.mean(axis=0)
      self.total = np.zeros(dim)
      self.total_outer = np.zeros((dim, dim))
    elif features.shape[1] != self.shift.shape[0]:
      raise UserError(f"FeatureMoments.add got {features.shape[1]}-d features after "
                       f"{self.shift.shape[0]}-d ones; use one feature function throughout.")
    centred = features - self.shift
    self.count += features.shape[0]
    self.total += centred.sum(axis=0)
    self.total_outer += centred.T @ centred

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of everything added, equal to `feature_statistics`."""
    if self.count < 2:
      raise UserError(f"FID statistics need at least 2 samples, got {self.count}; "
                       "pass more sample batches.")
    mean_centred = self.total / self.count
    scatter = self.total_outer - self.count * np.outer(mean_centred, mean_centred)
    sigma = scatter / (self.count - 1)
    return self.shift + mean_centred, (sigma + sigma.T) / 2


def _rows(batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def _fixed_size_batches(sample_batches: Iterable, batch_size: int, num_samples: int | None,
                        min_batches: int = 0) -> Iterator[tuple[object, int]]:
  """Re-chunks batches of any size into (batch of exactly `batch_size`, number of real rows).

  A batch is an array or a pytree of arrays with a common leading dimension (e.g. images and
  labels). The last batch is zero-padded; a fixed shape means the feature function compiles once.
  Batches that already have the right size pass through untouched (they may stay on device).
  All-padding batches follow until `min_batches` were yielded (processes must agree on a count).
  """
  pending, pending_count, seen, yielded, template = [], 0, 0, 0, None
  cat = lambda parts: jax.tree.map(lambda *a: np.concatenate(a), *parts) if len(parts) > 1 else parts[0]
  for batch in sample_batches:
    if num_samples is not None:
      batch = jax.tree.map(lambda a: a[:num_samples - seen], batch)  # pylint: disable=cell-var-from-loop
    size = _rows(batch)
    seen += size
    if template is None:
      template = jax.tree.map(lambda a: np.zeros((batch_size,) + a.shape[1:], a.dtype), batch)
    if not pending and size == batch_size:
      yielded += 1
      yield batch, batch_size
    elif size:
      pending.append(jax.tree.map(np.asarray, batch))
      pending_count += size
      while pending_count >= batch_size:
        joined = cat(pending)
        yielded += 1
        yield jax.tree.map(lambda a: a[:batch_size], joined), batch_size
        pending = [jax.tree.map(lambda a: a[batch_size:], joined)] if pending_count > batch_size else []
        pending_count -= batch_size
    if num_samples is not None and seen >= num_samples:
      break  # do not draw another batch from a possibly endless generator
  if num_samples is not None and seen < num_samples:
    raise UserError(f"compute_fid_stats: sample_batches ran out after {seen} samples, fewer "
                     f"than num_samples={num_samples}; yield more batches or lower num_samples.")
  if pending_count:
    rest = cat(pending)
    yielded += 1
    yield jax.tree.map(lambda a: np.concatenate(
        [a, np.zeros((batch_size - pending_count,) + a.shape[1:], a.dtype)]), rest), pending_count
  while yielded < min_batches:
    if template is None:
      raise UserError("compute_fid_stats: this process has no samples while others have some; give every "
                      "process at least one sample.")
    yielded += 1
    yield template, 0


def _to_global(local, sharding):
  """This process's rows -> one array sharded over the mesh (the processes' rows concatenated)."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def _to_host(array) -> np.ndarray:
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _agreed_num_batches(num_samples: int | None, batch_size: int) -> int:
  """With several processes, the most batches any process has, so all run the same collectives."""
  if jax.process_count() == 1 or num_samples is None:
    return 0
  counts = multihost_utils.process_allgather(np.int64(-(-num_samples // batch_size)))
  return int(np.max(counts))


def compute_fid_stats(feature_fn: Callable, sample_batches: Iterable, *, batch_size: int,
                      mesh: jax.sharding.Mesh | None = None, num_samples: int | None = None,
                      return_outputs: bool = False, progress: Callable | None = None):
  """Streams image batches through `feature_fn` and returns (mu, sigma) of the features.

  Args:
    feature_fn: images [B, ...] -> features [B, D]; e.g.
      `simjax.eval.inception.make_inception_feature_fn(variables, mesh)`. Jit it: it is called
      with one fixed batch shape. It may return (features, outputs) with outputs a pytree of
      per-row arrays [B, ...] (e.g. a classifier's predictions), see `return_outputs`.
    sample_batches: iterable of arrays [n_i, ...] (numpy or jax; sizes may vary), or of pytrees
      of arrays with a common leading dimension (e.g. (images, labels)), passed to feature_fn as
      such. With several processes each yields its own samples.
    batch_size: rows per feature_fn call (per process). Inputs are re-chunked to this size; the
      last chunk is zero-padded and its padding rows are dropped from the statistics.
    mesh: if given, each batch is sharded over the mesh's 'data' axis (and 'fsdp', if the mesh
      has one: NamedSharding(mesh, P(('data', 'fsdp')))) so every device computes features for
      its slice; required with several processes so that their samples are pooled.
    num_samples: stop after this many samples (per process); required for endless iterators.
      With several processes, give it: processes with fewer samples then pad with empty batches
      (without it, every process must yield the same number of batches).
    return_outputs: also return feature_fn's per-row outputs of the real rows, concatenated
      (with several processes: every process's rows, batch by batch, process by process).
    progress: called as progress(batches_done, rows_done) after each batch (rows: this process's).

  Returns:
    (mu [D], sigma [D, D]) in float64, as `feature_statistics` of all features at once; and the
    outputs, when return_outputs.
  """
  if batch_size < 1:
    raise UserError(f"compute_fid_stats: batch_size must be positive, got {batch_size}.")
  sharding = None
  if mesh is not None:
    if DATA not in mesh.axis_names:
      raise UserError(f"compute_fid_stats: the mesh has axes {mesh.axis_names} but no 'data' "
                      "axis; build it with simjax.parallel.mesh.make_mesh.")
    # The batch is split over every batch axis the mesh has ('data', and 'fsdp' if present), as
    # in training, so no device computes a replica of another's features.
    batch_axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    shards = int(np.prod([mesh.shape[axis] for axis in batch_axes]))
    processes = jax.process_count()
    if (batch_size * processes) % shards:
      raise UserError(f"compute_fid_stats: the global batch {batch_size * processes} does not "
                      f"divide over the mesh's {shards} batch devices; pick batch_size a "
                      f"multiple of {shards // np.gcd(shards, processes)}.")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
  elif jax.process_count() > 1:
    raise UserError("compute_fid_stats: with several processes pass mesh=..., otherwise each "
                    "process would compute statistics of its own samples only.")

  def dispatch(batch, num_real):
    """Starts the features of one batch (asynchronously on accelerators)."""
    real_rows = np.arange(batch_size) < num_real
    if sharding is None:
      return feature_fn(batch), real_rows
    # Each process pads its own last batch, so carry which rows are real in the same layout.
    return (feature_fn(jax.tree.map(lambda a: _to_global(a, sharding), batch)),
            _to_global(real_rows, sharding))

  def accumulate(result, real_rows):
    features, outputs = result if isinstance(result, tuple) else (result, None)
    features, real_rows = _to_host(features), _to_host(real_rows)
    if features.ndim != 2 or features.shape[0] != real_rows.shape[0]:
      raise UserError(f"compute_fid_stats: feature_fn returned shape {features.shape} for "
                       f"{real_rows.shape[0]} images; it must return features [B, D].")
    moments.add(features[real_rows])
    if return_outputs:
      collected.append(jax.tree.map(lambda a: _to_host(a)[real_rows], outputs))

  moments, collected = FeatureMoments(), []
  in_flight, done, rows = None, 0, 0

  def finish(started, num_real):
    nonlocal done, rows
    accumulate(*started)
    done, rows = done + 1, rows + num_real
    if progress is not None:
      progress(done, rows)

  min_batches = _agreed_num_batches(num_samples, batch_size) if sharding is not None else 0
  for batch, num_real in _fixed_size_batches(sample_batches, batch_size, num_samples, min_batches):
    # Start the next batch before reducing the previous one on the host, so the device's feature
    # extraction overlaps the float64 outer products.
    started = (dispatch(batch, num_real), num_real)
    if in_flight is not None:
      finish(*in_flight)
    in_flight = started
  if in_flight is not None:
    finish(*in_flight)
  stats = moments.statistics()
  if not return_outputs:
    return stats
  outputs = (jax.tree.map(lambda *a: np.concatenate(a), *collected) if collected else None)
  return stats + (outputs,)


# ---------------------------------------------------------------------------------------------
# Reference statistics files (EDM's fid-refs format: an .npz with `mu` [D] and `sigma` [D, D]).

def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu, sigma) in float64 from an `.npz` with keys `mu` and `sigma` (EDM fid-refs), or from EDM2's
  dataset-refs `.pkl` (a plain pickle of {'fid': {'mu', 'sigma'}, ...}, read through simjax's restricted
  unpickler: no code in it runs)."""
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"FID reference statistics not found at {os.fspath(path)!r}; download "
                     f"them (e.g. {EDM_FID_REFS_URL}cifar10-32x32.npz) or make them with "
                     "compute_fid_stats + save_reference_stats.")
  not_npz = (f"FID reference statistics {os.fspath(path)!r} are not a readable .npz (or EDM2 .pkl); pass an "
             ".npz with 'mu' [D] and 'sigma' [D, D].")
  if path.suffix == ".pkl":
    from simjax.torch_files import load_plain_pickle  # pylint: disable=import-outside-toplevel
    try:
      data = load_plain_pickle(path)
      data = data.get("fid", data) if isinstance(data, dict) else {}
      arrays = {key: np.asarray(data[key], np.float64) for key in ("mu", "sigma") if key in data}
      keys = sorted(str(k) for k in data)
    except (OSError, ValueError, TypeError) as error:  # unsafe or unreadable: the reason, in one line
      raise UserError(not_npz + f" ({' '.join(str(error).split())[:200]})") from None
  else:
    try:
      with path.open("rb") as f:
        data = np.load(f)  # pickles are refused (allow_pickle=False) with a ValueError
        if not isinstance(data, np.lib.npyio.NpzFile):
          raise UserError(not_npz)
        with data:
          arrays = {key: np.asarray(data[key], np.float64) for key in ("mu", "sigma") if key in data}
          keys = sorted(data.files)
    except (OSError, EOFError, ValueError) as error:
      raise UserError(not_npz) from error
  if len(arrays) != 2:
    raise UserError(f"FID reference statistics {os.fspath(path)!r} need keys 'mu' and 'sigma' "
                     f"but have {keys}; pass an .npz with 'mu' [D] and 'sigma' [D, D].")
  mu, sigma = arrays["mu"], arrays["sigma"]
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f"FID reference statistics {os.fspath(path)!r} have mu {mu.shape} and sigma "
                     f"{sigma.shape}; expected mu [D] and sigma [D, D].")
  return mu, sigma


def save_reference_stats(path: str | os.PathLike, mu, sigma) -> None:
  """Writes (mu, sigma) as an `.npz` that `load_reference_stats` and EDM's fid.py read."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f"save_reference_stats needs mu [D] and sigma [D, D], got {mu.shape} and "
                     f"{sigma.shape}; pass the output of feature_statistics/compute_fid_stats.")
  storage.atomic_write_npz(path, mu=mu, sigma=sigma)
