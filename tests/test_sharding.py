"""Results do not depend on the device count or the parameter sharding; the step loop never stalls on the host.

The device-count tests need 8 CPU devices, which XLA only creates if XLA_FLAGS is set before jax is
imported. This module is therefore also its own worker: `python tests/test_sharding.py CASE MESHES`
(e.g. `sim 1x1,8x1,2x4`) runs one case on 8 fake CPU devices and prints a JSON summary; the tests
launch it and check the summary. A worker builds every mesh inside one process (a 1-device mesh is
`devices[:1]`), so it compiles once per mesh shape and pays the jax import once. The mesh-rule and
step-loop tests run in the pytest process itself (1 device).

Why the optimizer state is compared too: Adam is invariant to the scale of the gradient, so a
gradient averaged with the wrong factor leaves the parameters almost unchanged; with b1 = 0 the
first moment *is* the last averaged gradient, and the second moment carries its magnitude. (Dropping
the 1/fsdp factor in sim_steps.average_grads changes mu by ~50% here, far outside the tolerances.) Dropout is 0 in these configs: its masks are drawn per
device (fold_in of the device index), so with dropout the results depend on the layout by design.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
STEPS = 3
# float32 reductions in another order: relative to the size of what is compared.
GRAD_RTOL = 1e-4       # averaged gradients (Adam mu with b1 = 0) and their squares (nu)
PARAM_RTOL = 2e-3      # parameter/EMA differences relative to how far the parameters moved
METRIC_RTOL = 1e-4     # losses and gradient norms

# ----------------------------------------------------------------------------------------------
# Worker side (runs in the subprocess; imports jax lazily so the launcher stays light).


def _small_gmm_config(fsdp_min_size=512):
  sys.path.insert(0, str(REPO / "configs"))
  import gmm2d  # pylint: disable=import-outside-toplevel
  c = gmm2d.get_config()
  c.model.hidden = 64
  c.model.num_blocks = 1
  c.model.emb_features = 32
  c.batch_size = 64
  c.fsdp_min_size = fsdp_min_size  # small enough that every matrix of the MLP is FSDP-sharded
  c.init.copy_steps = 0
  return c


def _tree_max_abs(tree):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  leaves = [np.max(np.abs(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree) if np.size(x)]
  return float(max(leaves)) if leaves else 0.0


def _tree_diff(a, b):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def _adam_moments(opt_state):
  """(mu, nu) trees of an optax chain's ScaleByAdamState, whatever its position in the chain."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1, f"expected one Adam state, found {len(found)}"
  return found[0].mu, found[0].nu


def _sharding_report(tree, min_size):
  """Per large leaf: spec, global and per-device shard shape, and how many distinct shards exist."""
  import jax  # pylint: disable=import-outside-toplevel
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, "sharding") or leaf.size < min_size:
      continue
    shards = leaf.addressable_shards
    distinct = {tuple((s.start, s.stop) for s in sh.index) for sh in shards}
    out[jax.tree_util.keystr(path)] = {
        "shape": list(leaf.shape), "spec": str(getattr(leaf.sharding, "spec", "")),
        "shard_shape": list(shards[0].data.shape), "num_devices": len(shards), "distinct_shards": len(distinct)}
  return out


def _bytes(tree):
  """(bytes held by device 0, bytes of the full arrays) over a pytree of jax arrays."""
  import jax  # pylint: disable=import-outside-toplevel
  dev0 = jax.devices()[0]
  per_device = total = 0
  for leaf in jax.tree.leaves(tree):
    total += leaf.nbytes
    per_device += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == dev0)
  return per_device, total


def _compare(run, ref, moved):
  """Relative differences of `run` against `ref` (both dicts from _run_sim/_run_teacher)."""
  out = {}
  scale = max(moved, 1e-30)
  out["params"] = _tree_max_abs(_tree_diff(run["params"], ref["params"])) / scale
  out["ema"] = _tree_max_abs(_tree_diff(run["ema"], ref["ema"])) / scale
  for name in ("mu", "nu"):
    out[name] = _tree_max_abs(_tree_diff(run[name], ref[name])) / max(_tree_max_abs(ref[name]), 1e-30)
  worst = 0.0
  for m_run, m_ref in zip(run["metrics"], ref["metrics"]):
    for k, v in m_ref.items():
      worst = max(worst, abs(m_run[k] - v) / max(abs(v), 1e-6))
  out["metrics"] = worst
  return out


def _host(tree):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _run_sim(config, distillation, mesh, init_params, steps):
  """`steps` SIM iterations of the library's own step, jitted as distill.train_sim does."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.training import distill, sim_steps, state as state_lib  # pylint: disable=import-outside-toplevel

  min_size = int(config.fsdp_min_size)
  init_fn = lambda: {"generator": init_params, "fake": jax.tree.map(jnp.copy, init_params)}
  specs, _ = distill.state_specs(jax.eval_shape(init_fn), mesh, distillation.optimizers, ("generator",), min_size)
  shardings = mesh_lib.specs_to_shardings(specs, mesh)
  state = jax.jit(lambda: state_lib.new_state(init_fn(), distillation.optimizers, ("generator",)),
                  out_shardings=shardings)()
  consts_specs = mesh_lib.param_specs(distillation.consts, mesh, min_size)
  consts = jax.device_put(distillation.consts, mesh_lib.specs_to_shardings(consts_specs, mesh))
  step_specs = {"generator": specs.params["generator"], "fake": specs.params["fake"], "consts": consts_specs}
  iteration = sim_steps.make_sim_iteration(distillation.nets, config, mesh, step_specs, distillation.optimizers)
  step = jax.jit(iteration, donate_argnums=0, out_shardings=(shardings, None))
  metrics = []
  for _ in range(steps):
    state, m = step(state, consts)
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  sharding = _sharding_report({"params": state.params, "opt_state": state.opt_state, "ema": state.ema}, min_size)
  per_device, total = _bytes({"params": state.params, "opt_state": state.opt_state, "ema": state.ema})
  host = _host(state)
  mu, nu = zip(*[_adam_moments(host.opt_state[k]) for k in ("generator", "fake")])
  return {"params": host.params, "ema": host.ema, "mu": list(mu), "nu": list(nu), "metrics": metrics,
          "sharding": sharding, "bytes_per_device": per_device, "bytes_total": total, "step": int(host.step)}


def _parse_meshes(meshes):
  return [tuple(int(n) for n in m.split("x")) for m in meshes.split(",")]


def _mesh_for(shape):
  import jax  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  assert len(devices) == NUM_DEVICES, devices
  n = shape[0] * shape[1]
  return mesh_lib.make_mesh(shape, devices[:n])  # (1, 1): a genuine 1-device mesh


def _summarize(runs, init_params):
  """Compares every run with the first one (the reference) and with the replicated 8x1 run if present."""
  names = list(runs)
  ref = runs[names[0]]
  moved = _tree_max_abs(_tree_diff(ref["params"], init_params))
  out = {"reference": names[0], "moved": moved,
         "compare": {k: _compare(r, ref, moved) for k, r in runs.items() if k != names[0]},
         "sharding": {k: r["sharding"] for k, r in runs.items()},
         "bytes": {k: [r["bytes_per_device"], r["bytes_total"]] for k, r in runs.items()},
         "metrics": {k: r["metrics"] for k, r in runs.items()}}
  if "8x1" in runs:
    out["compare_to_replicated"] = {k: _compare(r, runs["8x1"], moved) for k, r in runs.items()
                                    if "fsdp" in json.dumps(r["sharding"])}
  return out


def case_sim(meshes):
  """SIM on the gmm pipeline over the given meshes ('1x1,8x1,2x4'); indivisible batches are refused."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import common, gmm  # pylint: disable=import-outside-toplevel
  from simjax.training import sim_steps  # pylint: disable=import-outside-toplevel

  config = _small_gmm_config()
  distillation, _ = gmm.build(config)
  mlp = distillation.nets.generator.module
  init_params = mlp.init(jax.random.key(1), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  runs = {"%dx%d" % shape: _run_sim(config, distillation, _mesh_for(shape), init_params, STEPS)
          for shape in _parse_meshes(meshes)}
  result = _summarize(runs, {"generator": init_params, "fake": init_params})
  result["steps"] = {k: r["step"] for k, r in runs.items()}
  devices = jax.devices()

  # A global batch the mesh cannot split evenly is refused, by the step builder and by validation.
  errors = {}
  for shape in ((8, 1), (2, 4)):
    mesh = mesh_lib.make_mesh(shape, devices)
    bad = _small_gmm_config()
    bad.batch_size = 12
    try:
      sim_steps.make_sim_iteration(distillation.nets, bad, mesh, {}, distillation.optimizers)
      errors["%dx%d" % shape] = None
    except ValueError as e:
      errors["%dx%d" % shape] = str(e)
  bad = _small_gmm_config()
  bad.batch_size = 12
  bad.mesh_shape = (-1, 1)
  try:
    common.validate_common(bad)
    errors["validate"] = None
  except ValueError as e:
    errors["validate"] = str(e)
  result["batch_errors"] = errors
  return result


def _run_teacher(teacher_steps, config, denoiser, init_params, data, mesh, steps):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.training import state as state_lib  # pylint: disable=import-outside-toplevel

  optimizer = state_lib.make_optimizer(config.optim)
  min_size = int(config.fsdp_min_size)
  init_fn = lambda: state_lib.new_state({"denoiser": init_params}, {"denoiser": optimizer}, ("denoiser",))
  specs = mesh_lib.param_specs(jax.eval_shape(init_fn), mesh, min_size)
  shardings = mesh_lib.specs_to_shardings(specs, mesh)
  state = jax.jit(init_fn, out_shardings=shardings)()
  consts = jax.device_put({"data": data, "labels": None, "scale": jnp.float32(1.0), "shift": jnp.float32(0.0),
                           "extra": {}}, mesh_lib.replicated(mesh))
  step = teacher_steps.make_teacher_step(denoiser, config, mesh, specs.params["denoiser"], optimizer,
                                         label_dim=0, num_examples=int(data.shape[0]))
  step = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))
  metrics = []
  for _ in range(steps):
    state, m = step(state, consts)
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  sharding = _sharding_report({"params": state.params, "opt_state": state.opt_state}, min_size)
  per_device, total = _bytes({"params": state.params, "opt_state": state.opt_state, "ema": state.ema})
  host = _host(state)
  mu, nu = _adam_moments(host.opt_state["denoiser"])
  return {"params": host.params, "ema": host.ema, "mu": mu, "nu": nu, "metrics": metrics, "sharding": sharding,
          "bytes_per_device": per_device, "bytes_total": total}


def case_teacher(meshes):
  """The teacher DSM step (simjax/training/teacher_steps.py) over the given meshes."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from simjax import config_files  # pylint: disable=import-outside-toplevel
  from simjax.networks.mlp import MLPDenoiser  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import image_teacher  # pylint: disable=import-outside-toplevel
  from simjax.training import teacher_steps  # pylint: disable=import-outside-toplevel
  from simjax.training.roles import Denoiser  # pylint: disable=import-outside-toplevel

  # The teacher step's config as the image pipeline builds it (teacher_train, sigma_data, debug), plus the
  # mesh's fsdp_min_size for _run_teacher.
  image_config = config_files.load(REPO / "configs" / "common.py").image_config()
  c = image_teacher._teacher_step_config(image_config)  # pylint: disable=protected-access
  c.batch_size, c.seed, c.sigma_data, c.p_mean, c.p_std = 64, 3, 0.5, -1.2, 1.2
  c.ema_half_life_images, c.ema_rampup_ratio, c.fsdp_min_size = 2000.0, 0.5, 512
  c.optim.update(dict(lr=1e-3, b1=0.0, b2=0.999, eps=1e-8, warmup_steps=0, grad_clip=0.0))
  mlp = MLPDenoiser(data_dim=2, hidden=64, num_blocks=1, emb_features=32, dropout=0.0, sigma_data=0.5)
  init_params = mlp.init(jax.random.key(2), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  data = 0.5 * jax.random.normal(jax.random.key(4), (500, 2), jnp.float32)
  devices = jax.devices()
  runs = {"%dx%d" % shape: _run_teacher(teacher_steps, c, Denoiser(mlp), init_params, data, _mesh_for(shape), STEPS)
          for shape in _parse_meshes(meshes)}
  result = _summarize(runs, {"denoiser": init_params})
  bad = ml_collections.ConfigDict(c.to_dict())
  bad.batch_size = 12
  try:
    teacher_steps.make_teacher_step(Denoiser(mlp), bad, mesh_lib.make_mesh((8, 1), devices), {}, None,
                                    label_dim=0, num_examples=500)
    batch_error = None
  except ValueError as e:
    batch_error = str(e)
  result["batch_error"] = batch_error
  return result


def case_text(meshes):
  """SIM with text conditions (simjax.conditioning) over the given meshes: MLP generator, fake score and
  a random MLP teacher, all reading {'emb', 'mask'} drawn from a pool of prompts; guided teacher (w = 2)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from simjax.conditioning import CondSpace  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import gmm  # pylint: disable=import-outside-toplevel
  from simjax.training.roles import Denoiser  # pylint: disable=import-outside-toplevel

  config = _small_gmm_config()
  distillation, _ = gmm.build(config)
  with config.unlocked():
    config.teacher.guidance = 2.0  # after build, which allows guidance for class-conditional image teachers only
  space = CondSpace(text_length=5, text_dim=8)
  mlp = distillation.nets.generator.module.clone(text_dim=8)
  teacher = mlp.clone(hidden=32)
  example = (jnp.zeros((1, 2)), jnp.ones((1,)), space.zeros(1))
  init_params = mlp.init(jax.random.key(1), *example)["params"]
  lengths = jax.random.randint(jax.random.key(5), (12,), 1, 6)
  pool = {"emb": jax.random.normal(jax.random.key(6), (12, 5, 8)),
          "mask": (jnp.arange(5)[None] < lengths[:, None]).astype(jnp.float32)}
  nets = dataclasses.replace(distillation.nets, generator=Denoiser(mlp), fake=Denoiser(mlp),
                             teacher=Denoiser(teacher), cond_space=space)
  with_pool = lambda p: dataclasses.replace(distillation, nets=nets, consts={
      **distillation.consts, "teacher": teacher.init(jax.random.key(2), *example), "cond_pool": p})
  runs = {"%dx%d" % shape: _run_sim(config, with_pool(pool), _mesh_for(shape), init_params, STEPS)
          for shape in _parse_meshes(meshes)}
  result = _summarize(runs, {"generator": init_params, "fake": init_params})
  # The same run with every prompt blanked: if the condition reached no network, nothing would change.
  blank = {"emb": jnp.zeros_like(pool["emb"]), "mask": pool["mask"]}
  result["blank_metrics"] = _run_sim(config, with_pool(blank), _mesh_for((1, 1)), init_params, 1)["metrics"]
  return result


CASES = {"sim": case_sim, "teacher": case_teacher, "text": case_text}


def _worker_main(case, meshes):
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_threefry_partitionable", True)
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  result = CASES[case](meshes)
  print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Launcher side (pytest).


def run_worker(case, meshes, timeout=600):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, __file__, case, meshes], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise AssertionError(f"worker {case!r} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _assert_close(compare, label):
  assert compare["mu"] < GRAD_RTOL, (label, compare)
  assert compare["nu"] < GRAD_RTOL, (label, compare)
  assert compare["params"] < PARAM_RTOL, (label, compare)
  assert compare["ema"] < PARAM_RTOL, (label, compare)
  assert compare["metrics"] < METRIC_RTOL, (label, compare)


def _assert_fsdp_sharded(result, mesh, fsdp, prefixes):
  """Every large leaf under `prefixes` (params, both Adam moments, EMA) is split `fsdp` ways along one dim."""
  leaves = result["sharding"][mesh]
  sharded = {k: v for k, v in leaves.items() if "fsdp" in v["spec"]}
  for prefix in prefixes:
    assert any(k.startswith(prefix) for k in sharded), (mesh, prefix, sorted(leaves))
  for moment in (".mu", ".nu"):
    assert any(moment in k for k in sharded), (mesh, moment, sorted(sharded))
  for path, leaf in sharded.items():
    dims = [i for i, (a, b) in enumerate(zip(leaf["shape"], leaf["shard_shape"])) if a != b]
    assert len(dims) == 1 and leaf["shard_shape"][dims[0]] * fsdp == leaf["shape"][dims[0]], (mesh, path, leaf)
    assert leaf["distinct_shards"] == fsdp and leaf["num_devices"] == NUM_DEVICES, (mesh, path, leaf)
  per_device, total = result["bytes"][mesh]
  # What stays replicated is biases and norms; the bulk of the state is split fsdp ways.
  assert per_device < 1.5 * total / fsdp, (mesh, per_device, total)


SIM_PREFIXES = ("['params']['generator']", "['params']['fake']", "['ema']['generator']")


@pytest.fixture(scope="module")
def sim_result():
  return run_worker("sim", "1x1,8x1,2x4")


def test_sim_iteration_does_not_depend_on_device_count(sim_result):
  assert sim_result["reference"] == "1x1"
  assert sim_result["moved"] > 1e-4, "the parameters did not move: the comparison would prove nothing"
  assert set(sim_result["steps"].values()) == {STEPS}
  for row in sim_result["metrics"]["1x1"]:
    assert row["step_ok"] == 1 and row["gen_grad_norm"] > 0 and row["fake_grad_norm"] > 0, row
  assert set(sim_result["compare"]) == {"8x1", "2x4"}
  for mesh, compare in sim_result["compare"].items():
    _assert_close(compare, f"{mesh} vs 1 device")


def test_fsdp_shards_parameters_and_optimizer_state(sim_result):
  _assert_fsdp_sharded(sim_result, "2x4", 4, SIM_PREFIXES)
  replicated = sim_result["sharding"]["8x1"]
  assert replicated and all(v["distinct_shards"] == 1 for v in replicated.values())
  per_device, total = sim_result["bytes"]["8x1"]
  assert per_device == total


def test_fsdp_steps_match_replicated_run(sim_result):
  assert set(sim_result["compare_to_replicated"]) == {"2x4"}
  _assert_close(sim_result["compare_to_replicated"]["2x4"], "2x4 vs replicated 8x1")


def test_indivisible_global_batch_is_refused(sim_result):
  errors = sim_result["batch_errors"]
  for key in ("8x1", "2x4", "validate"):
    msg = errors[key]
    assert msg is not None, f"batch 12 on 8 devices was accepted ({key})"
    assert "batch_size=12" in msg and "8 devices" in msg and "multiple of 8" in msg, msg
    assert "\n" not in msg


def test_text_conditioned_sim_iteration_does_not_depend_on_device_count():
  result = run_worker("text", "1x1,2x4")
  assert result["moved"] > 1e-4, "the parameters did not move: the comparison would prove nothing"
  for row in result["metrics"]["1x1"]:
    assert row["step_ok"] == 1 and row["gen_grad_norm"] > 0 and row["fake_grad_norm"] > 0, row
  _assert_close(result["compare"]["2x4"], "text 2x4 (FSDP) vs 1 device")
  first, blank = result["metrics"]["1x1"][0], result["blank_metrics"][0]
  # (At step 0 the output layers are zero, so the losses cannot see the condition yet; the gradients do.)
  for key in ("fake_grad_norm", "gen_grad_norm"):
    assert abs(first[key] - blank[key]) > 1e-2 * abs(first[key]), (key, first[key], blank[key])


@pytest.mark.slow
def test_fsdp_over_all_eight_devices_matches_replicated_run():
  result = run_worker("sim", "8x1,1x8")
  _assert_fsdp_sharded(result, "1x8", 8, SIM_PREFIXES)
  _assert_close(result["compare"]["1x8"], "1x8 vs replicated 8x1")


def test_teacher_dsm_step_does_not_depend_on_device_count():
  result = run_worker("teacher", "1x1,2x4")
  assert result["moved"] > 1e-4
  _assert_close(result["compare"]["2x4"], "teacher 2x4 (FSDP) vs 1 device")
  _assert_fsdp_sharded(result, "2x4", 4, ("['params']['denoiser']",))
  msg = result["batch_error"]
  assert msg is not None and "teacher_train.batch_size=12" in msg and "multiple of 8" in msg, msg


@pytest.mark.slow
def test_teacher_dsm_step_replicated_on_eight_devices():
  result = run_worker("teacher", "1x1,8x1,1x8")
  for mesh, compare in result["compare"].items():
    _assert_close(compare, f"teacher {mesh} vs 1 device")


# ----------------------------------------------------------------------------------------------
# The mesh rules themselves (in-process, no devices needed).


def test_mesh_shape_and_fsdp_rules():
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  assert mesh_lib.resolve_mesh_shape((-1, 4), 8) == (2, 4)
  assert mesh_lib.resolve_mesh_shape((2, -1), 8) == (2, 4)
  for shape, devices, words in (((-1, 3), 8, "does not divide"), ((2, 2), 8, "uses 4 devices"),
                                ((-1, -1), 8, "at most one -1"), ((8,), 8, "must have 2 entries")):
    with pytest.raises(ValueError, match=words):
      mesh_lib.resolve_mesh_shape(shape, devices)
  # The largest dimension the fsdp size divides is split; small leaves and fsdp = 1 stay replicated.
  assert mesh_lib.fsdp_spec((3, 3, 128, 256), 4, min_size=1) == P(None, None, None, "fsdp")
  assert mesh_lib.fsdp_spec((256, 130), 4, min_size=1) == P("fsdp", None)
  assert mesh_lib.fsdp_spec((130, 6), 4, min_size=1) == P()
  assert mesh_lib.fsdp_spec((256, 256), 4, min_size=2**17) == P()
  assert mesh_lib.fsdp_spec((256, 256), 1, min_size=1) == P()


def test_distributed_env_errors_name_the_fix(monkeypatch):
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  ok = {"SIMJAX_COORDINATOR": "127.0.0.1:1234", "SIMJAX_NUM_PROCESSES": "2", "SIMJAX_PROCESS_ID": "1"}
  assert mesh_lib.explicit_distributed_setup(ok) == dict(coordinator_address="127.0.0.1:1234", num_processes=2,
                                                         process_id=1)
  for bad, words in (({"SIMJAX_COORDINATOR": "127.0.0.1"}, "needs a port"),
                     ({"SIMJAX_COORDINATOR": "h:1"}, "SIMJAX_NUM_PROCESSES and SIMJAX_PROCESS_ID"),
                     (dict(ok, SIMJAX_PROCESS_ID="2"), "must lie in")):
    with pytest.raises(ValueError, match=words):
      mesh_lib.explicit_distributed_setup(bad)
  for name in ("SIMJAX_DISTRIBUTED", "SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID"):
    monkeypatch.delenv(name, raising=False)
  assert mesh_lib.maybe_initialize_distributed() is False  # nothing asked: never waits for a coordinator


# ----------------------------------------------------------------------------------------------
# Throughput: the step loop never waits on the device except where it must (in-process, 1 device).
#
# A transfer guard cannot see device-to-host reads on the CPU backend (they are zero-copy), so the
# test makes every step whose results nobody may read *slow on the device*: the compiled step is
# followed by a ~1 s matmul spin that its outputs depend on (dispatched asynchronously). A hook
# right after such a step then finds the state not ready, unless the loop blocked on it. Only the
# logging steps (flushed one step later), checkpoint steps and the last step may be waited on.


def _spin_gate():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  @jax.jit
  def gate(tree, n):
    # A matmul loop (not a scalar loop: XLA:CPU runs cheap programs inline, i.e. synchronously).
    body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ c[1]))
    _, acc = jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), jnp.full((32, 32), 0.01, jnp.float32)))
    acc, tree = jax.lax.optimization_barrier((acc, tree))
    return tree, acc[0, 0]
  return gate


def _calibrated_spin(gate, seconds):
  import time  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  probe = {"x": jnp.zeros(())}
  gate(probe, 10)[1].block_until_ready()
  n = 20_000
  t0 = time.perf_counter()
  gate(probe, n)[1].block_until_ready()
  return max(1000, int(n * seconds / max(time.perf_counter() - t0, 1e-4)))


class GatedLoop:
  """The real SIM step (1 device) compiled once, run through loop.run_loop with gated non-logging steps."""

  def __init__(self, spin_seconds=0.5):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    from simjax.pipelines import gmm  # pylint: disable=import-outside-toplevel
    from simjax.training import distill, sim_steps, state as state_lib  # pylint: disable=import-outside-toplevel

    config = _small_gmm_config()
    config.model.hidden, config.model.emb_features, config.batch_size = 32, 16, 32
    distillation, _ = gmm.build(config)
    mesh = mesh_lib.make_mesh((1, 1), jax.devices()[:1])
    nets = distillation.nets
    params = nets.generator.module.init(jax.random.key(1), jnp.zeros((1,) + nets.data_shape), jnp.ones((1,)))["params"]
    init_fn = lambda: {"generator": params, "fake": jax.tree.map(jnp.copy, params)}
    specs, _ = distill.state_specs(jax.eval_shape(init_fn), mesh, distillation.optimizers, ("generator",),
                                   int(config.fsdp_min_size))
    shardings = mesh_lib.specs_to_shardings(specs, mesh)
    self.init = jax.jit(lambda: state_lib.new_state(init_fn(), distillation.optimizers, ("generator",)),
                        out_shardings=shardings)
    consts_specs = mesh_lib.param_specs(distillation.consts, mesh, int(config.fsdp_min_size))
    self.consts = jax.device_put(distillation.consts, mesh_lib.specs_to_shardings(consts_specs, mesh))
    step_specs = {"generator": specs.params["generator"], "fake": specs.params["fake"], "consts": consts_specs}
    self.step = jax.jit(sim_steps.make_sim_iteration(nets, config, mesh, step_specs, distillation.optimizers),
                        donate_argnums=0, out_shardings=(shardings, None))
    self.gate = _spin_gate()
    self.spin = jnp.int32(_calibrated_spin(self.gate, spin_seconds))

  def run(self, workdir, num_steps, log_every, checkpoint_every, extra_hooks=()):
    """Returns ({gated step: state ready right after it?}, (state, status), checkpointed steps)."""
    from simjax.training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from simjax.training import loop as loop_lib  # pylint: disable=import-outside-toplevel

    def may_wait(step):  # the steps whose results the loop is allowed to read
      return step % log_every == 0 or step % checkpoint_every == 0 or step == num_steps

    def step_fn(step):
      if may_wait(step + 1):
        return self.step
      return lambda st, c: self.gate(self.step(st, c), self.spin)[0]

    seen = {}
    def probe(step, st):
      if not may_wait(step):
        seen[step] = bool(st.step.is_ready())

    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", checkpoint_every)
    try:
      out = loop_lib.run_loop(state=self.init(), step_fn=step_fn, consts=self.consts, num_steps=num_steps,
                              checkpointer=checkpointer, writer=loop_lib.MetricWriter(workdir), log_every=log_every,
                              max_nonfinite_streak=5, stage="sim", hooks=list(extra_hooks) + [(1, probe)])
    finally:
      checkpointer.close()
    return seen, out, checkpointer.steps()


def test_step_loop_waits_on_the_device_only_at_logging_and_checkpoint_steps(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  harness = GatedLoop()
  seen, (state, status), saved = harness.run(tmp_path / "run", num_steps=8, log_every=4, checkpoint_every=6)
  assert status == "done" and int(state.step) == 8
  assert sorted(seen) == [1, 2, 3, 5, 7], seen
  blocked = [step for step, ready in seen.items() if ready]
  assert not blocked, f"the loop waited for the device after steps {blocked} (no logging or checkpoint there)"
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
  assert [r["step"] for r in rows] == [4, 8]
  assert saved == [6, 8]

  # The probe can fail: a hook that reads the step on the host makes the state ready at once.
  read_on_host = (1, lambda step, st: int(jax.device_get(st.step)))
  seen, _, _ = harness.run(tmp_path / "control", num_steps=3, log_every=10, checkpoint_every=10,
                           extra_hooks=[read_on_host])
  assert seen == {1: True, 2: True}, seen


if __name__ == "__main__":
  _worker_main(sys.argv[1], sys.argv[2])
