"""One batched sampler for every sample source (one-step generator, teacher Heun), on any number of hosts.

The samples are a deterministic function of (seed, global batch size): global batch i draws its
latents and conditions (simjax.conditioning) from fold_in(key(seed), i), laid out over the mesh's batch axes, so each device
computes only its rows (threefry is partitionable) and no process repeats another's work. Every
process keeps the rows its devices computed, with their global row numbers; after the last batch one
gather puts all rows, conditions beside them, in global order on every process. The process count and
the mesh layout change the work split, never the samples.
"""
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from simjax import draws
from simjax import conditioning
from simjax.conditioning import CondSpace
from simjax.diffusion import samplers
from simjax.errors import UserError
from simjax.parallel import mesh as mesh_lib


@dataclasses.dataclass
class Samples:
  """All samples (every process holds them) and this process's own rows (for sharded feature extraction)."""
  x: np.ndarray                        # [num, ...] in global order
  cond: Any                            # their conditions, [num, ...] pytree (None when unconditional)
  local_x: np.ndarray                  # the rows this process's devices computed
  local_cond: Any

  @property
  def labels(self) -> Optional[np.ndarray]:
    """One-hot class labels [num, label_dim] (None when unconditional or text-conditioned)."""
    return None if conditioning.is_text(self.cond) else self.cond

  @property
  def local_labels(self) -> Optional[np.ndarray]:
    return None if conditioning.is_text(self.local_cond) else self.local_cond


def check_batch_size(batch_size: int, mesh, what: str = "eval.batch_size"):
  shards = mesh_lib.num_batch_shards(mesh)
  if batch_size < 1 or batch_size % shards:
    raise UserError(f"{what}={batch_size} does not split over the {shards} devices of the mesh; "
                    f"set --config.{what} to a multiple of {shards}.")


def replicate(tree, mesh):
  """Host (or single-device) arrays -> replicated over the mesh; arrays already on the mesh stay as they are."""
  def put(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding):
      return x  # already on a mesh (e.g. the FSDP-sharded EMA): the sampler's jit gathers what it needs
    # Several processes: each puts its (identical) host copy on its own devices.
    return jax.device_put(x if jax.process_count() == 1 else np.asarray(x), mesh_lib.replicated(mesh))
  return jax.tree.map(put, tree)


def shard_rows(fn: Callable, mesh) -> Callable:
  """fn(params, *rows) run per device: params replicated, each rows argument (an array, a condition
  pytree or None) split by rows.

  The result is split by rows like the inputs. Use inside jit.
  """
  def call(params, *rows):
    present = [i for i, r in enumerate(rows) if r is not None]

    def local(p, *given):
      full = list(rows)
      for i, r in zip(present, given):
        full[i] = r
      return fn(p, *full)

    given = [rows[i] for i in present]
    out_ndim = rows[present[0]].ndim if present else 1
    specs = (P(),) + tuple(mesh_lib.batch_specs(r) for r in given)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=mesh_lib.batch_spec(out_ndim),
                         check_vma=False)(params, *given)
  return call


def make_heun_batch_fn(denoise: Callable, mesh, **settings) -> Callable:
  """batch_fn(params, z, cond) for `sample`: EDM's Heun sampler (`samplers.make_stepwise_sampler`,
  `settings` as there) with denoise(params, x, sigma, cond) run per device on its rows."""
  per_device = shard_rows(denoise, mesh)
  stepwise = samplers.make_stepwise_sampler(lambda p, x, s: per_device(p[0], x, s, p[1]), **settings)
  return lambda params, z, cond: stepwise((params, cond), z)


def make_noise_fn(batch_size: int, data_shape, cond_space: CondSpace, mesh, cond_pool=None) -> Callable:
  """key -> (z [B, *data_shape], conditions [B, ...] or None), laid out over the batch axes; text
  conditions are rows of `cond_pool`."""
  # Without a pool, text conditions cannot be drawn: they must be given to `sample`.
  space = CondSpace() if cond_space.kind == "text" and cond_pool is None else cond_space

  def draw(key, pool):
    k_z, k_c = jax.random.split(key)
    z = draws.normal(k_z, (batch_size,) + tuple(data_shape), jnp.float32)
    return z, space.draw(k_c, batch_size, pool)
  out = mesh_lib.batch_shardings(mesh, jax.eval_shape(draw, jax.random.key(0), cond_pool))
  jitted = jax.jit(draw, out_shardings=out)
  return lambda key: jitted(key, cond_pool)


@functools.lru_cache(maxsize=None)
def _reshard_fn(sharding):
  return jax.jit(lambda a: a, out_shardings=sharding)


def _as_rows(x, mesh):
  """x laid out by rows over the batch axes (a no-op when the compiler already chose that)."""
  target = mesh_lib.batch_sharding(mesh, x.ndim)
  return x if x.sharding.is_equivalent_to(target, x.ndim) else _reshard_fn(target)(x)


def _local_rows(array, offset):
  """(this process's rows of a row-split global array, their global row numbers), shards in row order."""
  shards = sorted((s for s in array.addressable_shards if s.replica_id == 0), key=lambda s: s.index[0].start or 0)
  data = [np.asarray(s.data) for s in shards]
  rows = [offset + np.arange(s.index[0].start or 0, s.index[0].stop or array.shape[0]) for s in shards]
  return np.concatenate(data), np.concatenate(rows)


def _progress_points(num_batches: int, every: int):
  every = max(1, every or math.ceil(num_batches / 10))
  return {i for i in range(num_batches) if (i + 1) % every == 0} | {0, num_batches - 1}


def sample(batch_fn: Callable, params, *, num: int, batch_size: int, seed: int, data_shape, cond_space: CondSpace,
           mesh, describe: str = "", progress_every: int = 0, noise_fn: Optional[Callable] = None, cond=None,
           cond_pool=None) -> Samples:
  """`num` samples of `batch_fn(params, z, cond) -> x` in global batches of `batch_size`.

  batch_fn gets latents z ~ N(0, I) [B, *data_shape] and conditions [B, ...] (or None), both split
  over the mesh's batch axes, and returns x [B, ...] (any layout: it is brought back to the rows').
  Every process must call this (it ends in a collective). `describe` names the source in the
  progress lines process 0 prints; `noise_fn` lets a caller reuse a compiled `make_noise_fn` (built with
  the same `cond_pool`).
  `cond` ([num, ...] rows, the same on every process) replaces the drawn conditions; the latents stay
  those of the seed, so the same seed with other conditions varies only the condition.
  """
  check_batch_size(batch_size, mesh)
  if num < 1:
    raise UserError(f"asked for {num} samples; ask for at least 1.")
  if cond is None and cond_space.kind == "text" and cond_pool is None:
    raise UserError("a text-conditioned model samples from given conditions or a pool of encoded prompts; "
                    "pass cond= or cond_pool=.")
  noise_fn = noise_fn or make_noise_fn(batch_size, data_shape, cond_space, mesh, cond_pool)
  base = jax.random.key(seed)
  num_batches = -(-num // batch_size)
  if cond is not None:
    if cond_space.kind == "none":
      raise UserError("conditions given for an unconditional model; sample without them.")
    cond_space.check(cond, num, "the conditions to sample")
    padded = jax.tree.map(lambda c: np.concatenate([c, np.repeat(c[-1:], num_batches * batch_size - num, axis=0)]),
                          conditioning.as_arrays(cond))
  report = jax.process_index() == 0 and bool(describe)
  points = _progress_points(num_batches, progress_every)
  xs, cs, rows = [], [], []
  t0 = time.time()

  def collect(i, x, cond):
    # Any layout the compiler chose -> rows split like the latents, so each process holds its own rows.
    x = _as_rows(x, mesh)
    local_x, local_rows = _local_rows(x, i * batch_size)
    xs.append(local_x)
    rows.append(local_rows)
    cs.append(jax.tree.map(lambda c: _local_rows(c, i * batch_size)[0], cond))
    if report and i in points:
      seconds = time.time() - t0
      print(f"{describe}: batch {i + 1}/{num_batches} ({min((i + 1) * batch_size, num)}/{num} samples, "
            f"{seconds:.1f}s, ~{seconds / (i + 1) * (num_batches - i - 1):.0f}s left)", flush=True)

  pending = None
  for i in range(num_batches):
    z, drawn = noise_fn(jax.random.fold_in(base, i))
    if cond is not None:
      drawn = jax.tree.map(
          lambda c: jax.make_array_from_callback((batch_size,) + c.shape[1:], mesh_lib.batch_sharding(mesh, c.ndim),
                                                 lambda index, r=c[i * batch_size:(i + 1) * batch_size]: r[index]),
          padded)
    started = (i, batch_fn(params, z, drawn), drawn)
    if pending is not None:  # fetch the previous batch while this one computes
      collect(*pending)
    pending = started
  collect(*pending)

  local = {"x": np.concatenate(xs), "rows": np.concatenate(rows),
           "cond": jax.tree.map(lambda *c: np.concatenate(c), *cs)}
  keep = local["rows"] < num
  local_x = local["x"][keep]
  local_cond = conditioning.take(local["cond"], keep)
  if jax.process_count() > 1:
    local = multihost_utils.process_allgather(local, tiled=True)  # the one gather
  order = np.argsort(local["rows"], kind="stable")
  if not np.array_equal(local["rows"][order], np.arange(num_batches * batch_size)):
    raise RuntimeError("sampler: the processes' rows do not tile the global batches once each")
  order = order[:num]
  x = np.asarray(local["x"])[order]
  cond = jax.tree.map(lambda c: np.asarray(c)[order], local["cond"])
  return Samples(x=x, cond=cond, local_x=local_x, local_cond=local_cond)
