"""SIM distillation: config -> mesh -> networks -> init or restore -> the step loop.

One trainer for vector and image teachers (the teacher factory decides the architecture); the
generator and the fake score start as copies of the teacher where the teacher is a network, and as
a fitted copy of it where the teacher is analytic.
"""
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import optax

from simjax import sampling
from simjax.errors import UserError
from simjax.parallel import mesh as mesh_lib
from simjax.training import checkpoint as ckpt_lib
from simjax.training import loop as loop_lib
from simjax.training import regression
from simjax.training import sim_steps
from simjax.training import state as state_lib
from simjax.training.roles import DistillNetworks


@dataclasses.dataclass(frozen=True)
class Distillation:
  """What a pipeline hands the SIM trainer: the whole description of one distillation.

  init_fn() -> {'generator', 'fake'} parameters at step 0 (traced abstractly for shapes first);
  consts: frozen inputs of the step, {'teacher': variables, 'generator'/'fake': non-trainable
  collections}; arch: the generator network's arch dict where it is exported (image runs);
  real_samples() -> {'x': [M, ...] model units, 'cond': [M, label_dim] or None}: the real samples the
  discriminator is shown (the data; an analytic teacher's exact samples), None where a run has none.
  cond_pool_window(w) -> the text conditions the generator draws from in steps [w * pool_every, (w + 1) *
  pool_every) (host arrays of one shape; streamed from an embedding cache), replacing consts['cond_pool'].
  """
  mesh: jax.sharding.Mesh
  nets: DistillNetworks
  init_fn: Callable[[], Dict[str, Any]]
  consts: Dict[str, Any]
  optimizers: Dict[str, optax.GradientTransformation]
  arch: Optional[Mapping[str, Any]] = None
  real_samples: Optional[Callable[[], Dict[str, Any]]] = None
  cond_pool_window: Optional[Callable[[int], Any]] = None
  pool_every: int = 0

  @property
  def generator_extra(self):
    """The generator's non-trainable collections (what `nets.generate` takes beside its params)."""
    return self.consts["generator"]


def compile_logged(fn, name, *args):
  """Ahead-of-time compile with the compile time logged (maxdiffusion habit)."""
  if jax.process_index() == 0:
    print(f"compiling {name} ...", flush=True)
  t0 = time.time()
  compiled = fn.lower(*args).compile()
  if jax.process_index() == 0:
    print(f"compiled {name} in {time.time() - t0:.1f}s", flush=True)
  return compiled


def state_specs(params, mesh, optimizers, ema_names, min_size):
  """PartitionSpecs for the whole TrainState under the FSDP rule (replicated when fsdp = 1)."""
  abstract = jax.eval_shape(lambda p: state_lib.new_state(p, optimizers, ema_names), params)
  return mesh_lib.param_specs(abstract, mesh, min_size), abstract


def setup_state(optimizers, config, mesh, checkpointer, *, init_fn, ema_names):
  """Restores the newest good checkpoint, or builds step 0 with `init_fn()` -> params dict.

  Returns (state, shardings, specs) with the state laid out on the mesh.
  """
  min_size = int(config.fsdp_min_size)
  abstract_params = jax.eval_shape(init_fn)
  specs, abstract_state = state_specs(abstract_params, mesh, optimizers, ema_names, min_size)
  shardings = mesh_lib.specs_to_shardings(specs, mesh)
  if checkpointer.steps():
    try:
      state, step = checkpointer.restore_latest_good(ckpt_lib.abstract_with_shardings(abstract_state, shardings))
      logging.info("resumed from checkpoint step %d", step)
      return state, shardings, specs
    except ckpt_lib.NoCheckpointError as e:
      raise UserError(f"no readable checkpoint in {checkpointer.directory} ({e}); "
                         "rerun with --overwrite to start over, or restore the files.") from None
  # Params are an argument, not a closure: a copied 55M-parameter teacher must not become an HLO constant.
  init = jax.jit(lambda p: state_lib.new_state(p, optimizers, ema_names), out_shardings=shardings)
  return init(init_fn()), shardings, specs


def restore_or_init(distillation: Distillation, config, checkpointer):
  """`setup_state` for a distillation: (state, shardings, specs)."""
  return setup_state(distillation.optimizers, config, distillation.mesh, checkpointer,
                     init_fn=distillation.init_fn, ema_names=("generator",))


def iteration_inputs(distillation: Distillation, config, specs):
  """(consts on the mesh, the iteration's specs): the step's frozen inputs, with DMD's regression pairs
  where loss.regression_weight > 0 (drawn again on resume: the same seed gives the same pairs) and the real
  samples where the discriminator is trained."""
  consts = dict(distillation.consts)
  if distillation.cond_pool_window is not None:
    consts["cond_pool"] = distillation.cond_pool_window(0)
  if regression.settings(config)[0]:
    consts["regression"] = regression.make_pairs(distillation.nets, consts["teacher"], config, distillation.mesh)
  if sim_steps.discriminator_needed(config, math.prod(distillation.nets.data_shape)):
    if distillation.real_samples is None:
      raise UserError(f"the discriminator ({sim_steps.DISCRIMINATOR_USE}) needs real samples, and this run has "
                      "none; set --config.adversarial.weight=0 and another loss.name.")
    consts[sim_steps.REAL] = distillation.real_samples()
  consts_specs = mesh_lib.param_specs(consts, distillation.mesh, int(config.fsdp_min_size))
  consts = jax.device_put(consts, mesh_lib.specs_to_shardings(consts_specs, distillation.mesh))
  return consts, {"generator": specs.params["generator"], "fake": specs.params["fake"], "consts": consts_specs}


def train_sim(config, workdir, distillation: Distillation, checkpointer, writer, hooks=()):
  """Runs SIM distillation to config.num_steps; returns (state, status, specs)."""
  del workdir  # the checkpointer and writer already point into it
  mesh, nets = distillation.mesh, distillation.nets
  state, shardings, specs = restore_or_init(distillation, config, checkpointer)
  consts, step_specs = iteration_inputs(distillation, config, specs)
  consts = windowed_consts(distillation, consts, step_specs["consts"]["cond_pool"]) if (
      distillation.cond_pool_window is not None) else consts

  compiled = {}
  def step_fn(step):
    with_gen = step >= int(config.fake_warmup_steps)
    if with_gen not in compiled:
      it = sim_steps.make_sim_iteration(nets, config, mesh, step_specs, distillation.optimizers,
                                        with_generator=with_gen)
      jitted = jax.jit(it, donate_argnums=0, out_shardings=(shardings, None))
      compiled[with_gen] = compile_logged(jitted, f"sim iteration (generator={with_gen})", state,
                                          consts(step) if callable(consts) else consts)
    return compiled[with_gen]

  state, status = loop_lib.run_loop(
      state=state, step_fn=step_fn, consts=consts, num_steps=int(config.num_steps), checkpointer=checkpointer,
      writer=writer, log_every=int(config.log_every), max_nonfinite_streak=int(config.max_nonfinite_streak),
      stage="sim", hooks=hooks, progress_keys=("fake_loss", "gen_loss"))
  return state, status, specs


def windowed_consts(distillation: Distillation, consts, pool_specs):
  """consts(step): `consts` with the prompt pool of step's window (distillation.cond_pool_window), placed
  like the first window; the current window is kept on the devices until the next one starts."""
  shardings = mesh_lib.specs_to_shardings(pool_specs, distillation.mesh)
  every = max(1, int(distillation.pool_every))
  current = {"window": 0, "consts": consts}

  def at(step):
    w = int(step) // every
    if w != current["window"]:
      pool = jax.device_put(distillation.cond_pool_window(w), shardings)
      current.update(window=w, consts={**consts, "cond_pool": pool})
    return current["consts"]
  return at


def mesh_of(tree):
  """The mesh a pytree's arrays are laid out on, else the ('data', 'fsdp') mesh over every device."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  return mesh_lib.make_mesh((-1, 1))


def make_generator_sampler(nets, gen_extra, batch: int, mesh=None, cond_pool=None):
  """sample(gen_params, num, seed, describe='', cond=None) -> sampling.Samples: one-step samples in
  global batches, deterministic in seed, split over `mesh` (default: that of the params) and gathered
  once; conditions drawn from nets.cond_space (text: rows of `cond_pool`) unless `cond` gives them. The
  batch function compiles once per sampler, so build it once and reuse it."""
  def generate(p, z, cond):
    params, extra = p
    return nets.generate(params, extra, z, cond)

  built = {}

  def sample(gen_params, num: int, seed: int, describe: str = "", cond=None):
    if not built:
      m = mesh if mesh is not None else mesh_of(gen_params)
      sampling.check_batch_size(batch, m)
      built.update(mesh=m, extra=sampling.replicate(gen_extra, m),
                   noise=sampling.make_noise_fn(batch, nets.data_shape, nets.cond_space, m, cond_pool),
                   fn=jax.jit(sampling.shard_rows(generate, m), out_shardings=mesh_lib.batch_sharding(
                       m, 1 + len(nets.data_shape))))
    return sampling.sample(built["fn"], (gen_params, built["extra"]), num=num, batch_size=batch, seed=seed,
                           data_shape=nets.data_shape, cond_space=nets.cond_space, mesh=built["mesh"],
                           describe=describe, noise_fn=built["noise"], cond=cond, cond_pool=cond_pool)
  return sample


def generate_samples(nets, gen_params, gen_extra, num: int, batch: int, seed: int, mesh=None, describe: str = "",
                     cond_pool=None):
  """(x, their conditions or None): num one-step samples from the generator on every process; see
  `make_generator_sampler`."""
  out = make_generator_sampler(nets, gen_extra, batch, mesh, cond_pool)(gen_params, num, seed, describe)
  return out.x, out.cond
