"""The performance switches (config.perf) change speed and memory only: the same SIM step, no recompiles.

Each switch is compared with the plain float32 step on the same inputs: gradients of the generator
step (SIM surrogate) and of the fake-score step (DSM), on a small SongUNet with attention and dropout
whose generator and fake score are perturbed copies of the teacher (so D_teacher != D_fake, as in
training). Rematerialisation and the fused teacher/fake call only reorder float32 arithmetic;
bfloat16 is held to bfloat16 tolerance and must differ measurably from float32 (else it was not used).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO
from simjax.networks import precond as precond_lib
from simjax.parallel import mesh as mesh_lib
from simjax import config_files
from simjax.training import perf, sim_steps
from simjax.conditioning import CondSpace
from simjax.training.roles import Denoiser, DistillNetworks

# One resolution level (8x8) with attention: few ops, so each variant compiles in seconds.
ARCH = precond_lib.edm_preset_arch("ddpmpp", img_resolution=8, img_channels=1, model_channels=16, channel_mult=(1,),
                                   num_blocks=1, attn_resolutions=(8,), dropout=0.1, augment_dim=0,
                                   channel_mult_emb=2)
BATCH = 16
# The same float32 maths in another order. The SIM gradient goes through D_teacher - D_fake, a
# difference of nearby outputs, which lifts rounding (~1e-7 of D) to ~2e-5 of the gradient; a
# wrong recomputation (e.g. another dropout mask) is off by O(1).
F32_RTOL = 1e-4
# bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per op); through two UNets and a
# difference of denoisers the gradients land within ~1% (measured 0.58% generator, 0.26% fake). 5%
# still fails a step that drops a term or mixes up a network.
BF16_RTOL = 5e-2
BF16_MIN_DIFF = 1e-4  # below this the bfloat16 path was not taken


def _config(**perf_overrides):
  c = config_files.load(REPO / "configs" / "common.py").image_config()
  c.batch_size = BATCH
  c.loss.huber_c_per_dim = 0.1
  for key, value in perf_overrides.items():
    if key.startswith("remat_"):
      c.perf.remat[key[len("remat_"):]] = value
    else:
      c.perf[key] = value
  return c


@pytest.fixture(scope="module")
def setup():
  module = precond_lib.build_precond(ARCH)
  with jax.threefry_partitionable(False):  # as the pipelines initialise (fast to compile on CPU)
    teacher = jax.jit(precond_lib.init_params, static_argnums=0)(module, jax.random.key(0))
  params = teacher["params"]
  rng = np.random.default_rng(0)
  perturb = lambda tree, scale: jax.tree.map(
      lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), jnp.float32) * (jnp.std(x) + 1e-3), tree)
  nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                         data_shape=(8, 8, 1), cond_space=CondSpace(), sigma_init=2.5)
  key = jax.random.key(3)
  k_z, k_s, k_e = jax.random.split(key, 3)
  inputs = dict(z=jax.random.normal(k_z, (BATCH, 8, 8, 1)), labels=None,
                sigma=jnp.exp(jax.random.normal(k_s, (BATCH,)) - 0.5), eps=jax.random.normal(k_e, (BATCH, 8, 8, 1)),
                rng=jax.random.key(4))
  return dict(nets=nets, gen=perturb(params, 0.05), fake=perturb(params, 0.05), consts={"teacher": teacher,
              "generator": {}, "fake": {}}, inputs=inputs)


def _step_grads(setup, config):
  """make_step_grads on one device with everything replicated."""
  mesh = mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1])
  rep = lambda t: jax.tree.map(lambda _: P(), t)
  specs = {"generator": rep(setup["gen"]), "fake": rep(setup["fake"]), "consts": rep(setup["consts"])}
  return sim_steps.make_step_grads(setup["nets"], config, mesh, specs)


def _grads(setup, config, which):
  fn = getattr(_step_grads(setup, config), which)
  i = setup["inputs"]
  loss, grads, _ = jax.jit(fn)(setup["gen"], setup["fake"], setup["consts"], i["z"], i["labels"], i["sigma"], i["eps"],
                               i["rng"])
  return float(loss), grads


def _rel_err(a, b):
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(setup):
  return {which: _grads(setup, _config(compute_dtype="float32"), which) for which in ("generator", "fake")}


@pytest.mark.parametrize("which", ["generator", "fake"])
def test_bfloat16_step_matches_float32_to_bfloat16_tolerance(setup, reference, which):
  loss, grads = _grads(setup, _config(compute_dtype="bfloat16"), which)
  ref_loss, ref_grads = reference[which]
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads)), "master gradients must stay float32"
  err = _rel_err(grads, ref_grads)
  assert err < BF16_RTOL, f"{which}: bfloat16 gradients are {err:.2%} off float32"
  assert err > BF16_MIN_DIFF, f"{which}: bfloat16 gradients equal float32 ({err:.1e}); the bf16 path was not used"
  assert abs(loss - ref_loss) <= BF16_RTOL * abs(ref_loss) + 1e-6, (loss, ref_loss)


@pytest.mark.parametrize("policy", ["blocks", "full"])
def test_rematerialisation_gives_the_same_generator_step(setup, reference, policy):
  loss, grads = _grads(setup, _config(compute_dtype="float32", remat_generator=policy, remat_teacher=policy,
                                      remat_fake=policy), "generator")
  ref_loss, ref_grads = reference["generator"]
  assert _rel_err(grads, ref_grads) < F32_RTOL
  assert loss == pytest.approx(ref_loss, rel=F32_RTOL, abs=1e-7)


def test_accelerator_rematerialisation_gives_the_same_generator_step(setup, reference):
  """remat 'full' as accelerators trace it (jax.checkpoint; XLA:CPU's ordered custom VJP is the case above):
  the same step."""
  from simjax import xla_cpu
  config = _config(compute_dtype="float32", remat_generator="full", remat_teacher="full", remat_fake="full")
  i = setup["inputs"]
  program = lambda: str(jax.make_jaxpr(_step_grads(setup, config).generator)(
      setup["gen"], setup["fake"], setup["consts"], i["z"], i["labels"], i["sigma"], i["eps"], i["rng"]))
  with xla_cpu.plain_forms():
    loss, grads = _grads(setup, config, "generator")
    plain = program()
  assert "remat" in plain and "remat" not in program()  # jax.checkpoint here; XLA:CPU's custom VJP by default
  ref_loss, ref_grads = reference["generator"]
  assert _rel_err(grads, ref_grads) < F32_RTOL
  assert loss == pytest.approx(ref_loss, rel=F32_RTOL, abs=1e-7)


def test_fused_teacher_and_fake_call_gives_the_same_generator_step(setup, reference):
  loss, grads = _grads(setup, _config(compute_dtype="float32", fuse_teacher_fake=True), "generator")
  ref_loss, ref_grads = reference["generator"]
  assert _rel_err(grads, ref_grads) < F32_RTOL
  assert loss == pytest.approx(ref_loss, rel=F32_RTOL, abs=1e-7)


def test_block_remat_and_dtype_keep_the_parameter_tree():
  module = precond_lib.build_precond(ARCH)
  clone = perf.configure_module(module, dtype=jnp.bfloat16, remat_blocks=True)
  assert clone.model.remat_blocks and clone.model.dtype == jnp.bfloat16
  assert precond_lib.param_shapes(clone) == precond_lib.param_shapes(module)
  bare = perf.configure_module(module.model, dtype=jnp.bfloat16, remat_blocks=True)  # no preconditioner
  assert bare.remat_blocks and bare.dtype == jnp.bfloat16


@pytest.mark.parametrize("override, message", [
    (dict(compute_dtype="float16"), "perf.compute_dtype"),
    (dict(remat_teacher="some"), "perf.remat.teacher"),
    (dict(fuse_teacher_fake=True, remat_teacher="full"), "one remat policy"),
])
def test_bad_perf_settings_are_refused_with_the_fix(override, message):
  with pytest.raises(ValueError, match=message):
    perf.resolve(_config(**override))


def test_auto_dtype_is_bfloat16_on_accelerators_only():
  assert perf.resolve(_config(), backend="cpu").compute_dtype == jnp.float32
  assert perf.resolve(_config(), backend="gpu").compute_dtype == jnp.bfloat16
  assert perf.resolve(_config(), backend="tpu").compute_dtype == jnp.bfloat16


def test_block_remat_of_a_network_without_blocks_is_refused():
  from simjax.networks.mlp import MLPDenoiser  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="needs a network with blocks"):
    perf.configure_module(MLPDenoiser(data_dim=2), remat_blocks=True, label="teacher")


class LoweringCounter:
  """Counts programs JAX lowers for compilation (each new trace + compile, cache hit or not)."""
  EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

  def __init__(self):
    self.count = 0

  def __call__(self, name, seconds, **kwargs):
    del seconds, kwargs
    self.count += name == self.EVENT

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_training_loop_compiles_nothing_after_the_first_steps(setup, tmp_path):
  """The real trainer (train_sim: warm-up switch, logging, checkpoints, a sample-grid hook) compiles
  each program once; from then on every step reuses them."""
  from simjax.pipelines import common, image  # pylint: disable=import-outside-toplevel
  from simjax.training import distill, state as state_lib  # pylint: disable=import-outside-toplevel
  config = _config(compute_dtype="float32")
  config.num_steps, config.log_every, config.checkpoint_every = 9, 2, 3
  config.fake_warmup_steps = 2           # steps 0-1 compile the fake-only iteration, step 2 the full one
  config.grid_every, config.grid_size = 2, 2
  optimizers = {name: state_lib.make_optimizer(config.optim[name]) for name in ("generator", "fake")}
  run_setup = distill.Distillation(mesh=mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1]), nets=setup["nets"],
                                   consts=setup["consts"], optimizers=optimizers,
                                   init_fn=lambda: {"generator": setup["gen"], "fake": setup["fake"]})
  checkpointer, writer = common.open_stage(config, tmp_path)
  seen = {}
  with LoweringCounter() as counter:
    start = counter.count
    record = (1, lambda step, state: seen.setdefault(step, counter.count))
    try:
      _, status, _ = distill.train_sim(config, tmp_path, run_setup, checkpointer, writer,
                                       hooks=[(2, image.grid_hook(config, tmp_path, run_setup)), record])
    finally:
      checkpointer.close()
  assert status == "done" and sorted(seen) == list(range(1, 10))
  assert seen[3] > start, "the counter saw no compilation at all; it cannot detect recompiles"
  # By step 4 every program has run once (both iterations, log flush, checkpoint, grid hook).
  assert seen[9] == seen[4], f"programs lowered again after step 4: {[(s, seen[s]) for s in range(4, 10)]}"


def _generator_step_temp_bytes(setup, config, batch):
  """XLA's temporary allocation (live-range packed activations) of the compiled generator step."""
  config.batch_size = batch
  fn = _step_grads(setup, config).generator
  z = jnp.zeros((batch,) + setup["nets"].data_shape)
  args = (setup["gen"], setup["fake"], setup["consts"], z, None, jnp.ones((batch,)), z, jax.random.key(0))
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_full_remat_keeps_about_one_networks_activations(setup):
  """Recomputing all three networks after their cotangents arrive leaves ~one network's activations
  alive instead of three (deterministic: XLA's buffer assignment, not a timing). The 0.6 bound fails
  for plain jax.checkpoint, whose recomputation XLA:CPU schedules early (measured ratio 1.0)."""
  plain = _generator_step_temp_bytes(setup, _config(compute_dtype="float32"), 256)
  full = _generator_step_temp_bytes(setup, _config(compute_dtype="float32", remat_generator="full",
                                                   remat_teacher="full", remat_fake="full"), 256)
  assert full < 0.6 * plain, f"remat 'full' temporaries {full / 2**20:.1f} MiB vs {plain / 2**20:.1f} MiB without"
