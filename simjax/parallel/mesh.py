"""One device mesh for every trainer: batch on ('data', 'fsdp'), parameters optionally on 'fsdp'.

The same code path runs on one CPU device and on a pod slice (DESIGN.md section 2): per-device work
is written for `jax.shard_map`, gradients are averaged with explicit collectives, and a parameter
whose leading dimension divides the 'fsdp' axis can be stored sharded (FSDP-style: gathered
inside the step, its gradient reduce-scattered back by the transpose of the gather).
"""
import logging
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simjax.errors import UserError

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)
BATCH_AXES = (DATA, FSDP)  # the batch is split over every device


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple:
  """Fills the one -1 entry with the remaining devices; errors say how to fix the shape."""
  shape = [int(s) for s in mesh_shape]
  if len(shape) != len(AXES):
    raise UserError(f"mesh_shape must have {len(AXES)} entries {AXES}, got {tuple(shape)}; e.g. --config.mesh_shape='(-1,1)'.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f"mesh_shape {tuple(shape)} may hold at most one -1 and otherwise positive sizes.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f"mesh_shape {tuple(shape)} does not divide the {num_devices} devices; pick sizes whose product divides it.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise UserError(f"mesh_shape {tuple(shape)} uses {math.prod(shape)} devices but {num_devices} are present; "
                     "use -1 for one axis to take the rest.")
  return tuple(shape)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1), devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: every device of every process).

  jax.devices() lists devices process by process, so 'fsdp' (the last axis) stays inside a host
  where it fits. On TPU the order follows the ICI torus instead (mesh_utils), so neighbours along
  each axis are physical neighbours.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  grid = None
  if devices[0].platform == "tpu":
    try:
      from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception as e:  # pylint: disable=broad-except  # unusual slice shapes: plain order is still valid
      logging.warning("mesh %s: no topology-aware layout (%s); using device order", shape, e)
  if grid is None:
    grid = np.asarray(devices).reshape(shape)
  # Mesh built directly: shard_map over unsharded (replicated) inputs needs Auto axes.
  return Mesh(grid, AXES)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch_size"):
  n = num_batch_shards(mesh)
  if global_batch % n:
    raise UserError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
                     f"set --config.{what} to a multiple of {n}.")


def batch_spec(ndim: int = 1) -> P:
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim))


def batch_specs(tree):
  """A row-split PartitionSpec for each array of `tree` (an array, a condition pytree; None stays None)."""
  return jax.tree.map(lambda x: batch_spec(x.ndim), tree)


def batch_shardings(mesh: Mesh, tree):
  """`batch_specs(tree)` as shardings on `mesh`."""
  return jax.tree.map(lambda x: batch_sharding(mesh, x.ndim), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2**14) -> P:
  """The rule for parameter sharding: the largest dimension divisible by the 'fsdp' axis size.

  Small tensors (biases, norms) stay replicated: gathering them costs more latency than it saves.
  """
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = FSDP
      return P(*spec)
  return P()


def param_specs(tree, mesh: Mesh, min_size: int = 2**14):
  """PartitionSpecs of a parameter (or optimizer-state) pytree under the FSDP rule."""
  return jax.tree.map(lambda x: fsdp_spec(np.shape(x), mesh.shape[FSDP], min_size), tree)


def specs_to_shardings(specs, mesh: Mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def gather_params(tree, specs):
  """Inside shard_map: all-gather FSDP-sharded leaves to full arrays (no-op for replicated ones)."""
  def gather(x, spec):
    for dim, axis in enumerate(spec):
      if axis == FSDP:
        return jax.lax.all_gather(x, FSDP, axis=dim, tiled=True)
    return x
  return jax.tree.map(gather, tree, specs, is_leaf=lambda s: isinstance(s, P))


def maybe_initialize_distributed(requested: bool = False) -> bool:
  """Starts JAX's multi-host runtime when asked (flag or SIMJAX_DISTRIBUTED=1) or on a multi-worker launch.

  Cloud TPU pods and SLURM are auto-detected by `jax.distributed.initialize()` itself; we only decide
  *whether* to call it, so a single-process run never waits for a coordinator. Elsewhere (bare
  clusters, tests) SIMJAX_COORDINATOR=host:port, SIMJAX_NUM_PROCESSES and SIMJAX_PROCESS_ID say where
  to meet. On CPU, collectives across processes use gloo, jax 0.10's default
  `jax_cpu_collectives_implementation` (tests/test_multihost.py runs 2 processes this way).
  """
  env = os.environ
  wanted = requested or env.get("SIMJAX_DISTRIBUTED", "") == "1"
  slurm_multi = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
  tpu_multi = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("CLOUD_TPU_TASK_ID", "")
  if not (wanted or slurm_multi or tpu_multi):
    return False
  kwargs = {}
  if "SIMJAX_COORDINATOR" in env:  # explicit setup (tests, bare clusters)
    kwargs = explicit_distributed_setup(env)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    reason = " ".join(str(e).split())[:200]
    asked = "--distributed" if requested else ("SIMJAX_DISTRIBUTED=1" if wanted else "a multi-worker launch")
    raise UserError(f"{asked} asked for a multi-host run, but jax.distributed.initialize() failed ({reason}); "
                     "run under a cluster JAX detects (Cloud TPU pod, SLURM), or set SIMJAX_COORDINATOR=host:port, "
                     "SIMJAX_NUM_PROCESSES and SIMJAX_PROCESS_ID on every process, or drop --distributed / "
                     "SIMJAX_DISTRIBUTED for a single-process run.") from None
  return True


def explicit_distributed_setup(env) -> dict:
  """jax.distributed.initialize kwargs from SIMJAX_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID, checked."""
  address = env["SIMJAX_COORDINATOR"]
  if ":" not in address:
    raise UserError(f"SIMJAX_COORDINATOR={address!r} needs a port; use host:port, e.g. 10.0.0.2:1234.")
  try:
    num, pid = int(env["SIMJAX_NUM_PROCESSES"]), int(env["SIMJAX_PROCESS_ID"])
  except (KeyError, ValueError):
    raise UserError("SIMJAX_COORDINATOR is set, so SIMJAX_NUM_PROCESSES and SIMJAX_PROCESS_ID must be integers "
                     "(set both on every process).") from None
  if num < 1 or not 0 <= pid < num:
    raise UserError(f"SIMJAX_PROCESS_ID={pid} must lie in [0, SIMJAX_NUM_PROCESSES={num}); number processes 0..N-1.")
  return dict(coordinator_address=address, num_processes=num, process_id=pid)
