"""Teacher training with EDM's loss (Karras et al. 2022, Sec. 5) as one pure, jittable step.

The dataset sits on the devices (replicated) and each step gathers the rows of a global batch drawn
from fold_in(base_key, step): no host input pipeline, no RNG state, and the same examples and noise
for any device count. Per-device work runs inside shard_map like the SIM iteration.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simjax import conditioning
from simjax.losses import dsm
from simjax.parallel import mesh as mesh_lib
from simjax.training import state as state_lib
from simjax.training.roles import Denoiser
from simjax.training.sim_steps import average_grads, constrain_batch, device_index, inject_nonfinite


def make_teacher_step(denoiser: Denoiser, config, mesh, specs, optimizer, *, label_dim: int, num_examples: int):
  """Builds step(state, consts) -> (state, metrics); consts = {'data': x, 'labels': one-hot or None, 'extra': {}}.

  config: the `teacher_train` section (batch_size, seed, p_mean, p_std, ema_half_life_images, ...).
  """
  batch = int(config.batch_size)
  mesh_lib.check_batch_divisible(batch, mesh, "teacher_train.batch_size")
  base_key = jax.random.key(int(config.seed))
  sigma_data = float(config.sigma_data)

  def local(params, extra, x0, cond, sigma, eps, rng):
    rng = jax.random.fold_in(rng, device_index(mesh))
    def loss_fn(p_local):
      p = mesh_lib.gather_params(p_local, specs)
      denoise = lambda p_, x, s: denoiser.apply(p_, extra, x, s, cond, train=True, rng=rng)
      return dsm.dsm_loss(p, denoise, x0, sigma, eps, sigma_data)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.lax.pmean(loss, mesh_lib.BATCH_AXES), average_grads(grads, specs, mesh)

  def step(state: state_lib.TrainState, consts):
    key = jax.random.fold_in(base_key, state.step)
    k_idx, k_noise, k_rng = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch,), 0, num_examples)
    x0 = constrain_batch(consts["data"][idx].astype(jnp.float32) * consts["scale"] + consts["shift"], mesh)
    cond = None if not label_dim else constrain_batch(jax.nn.one_hot(consts["labels"][idx], label_dim), mesh)
    # Condition dropout: the null condition on a fraction of rows, so the teacher also learns D(x, sigma, null) (CFG).
    cond = conditioning.drop(jax.random.fold_in(key, 3), cond, float(config.label_dropout))
    sigma, eps = dsm.draw_dsm_noise(k_noise, x0.shape, float(config.p_mean), float(config.p_std))
    fn = jax.shard_map(local, mesh=mesh, check_vma=False,
                       in_specs=(specs, P(), *mesh_lib.batch_specs((x0, cond, sigma, eps)), P()),
                       out_specs=(P(), specs))
    loss, grads = fn(state.params["denoiser"], consts["extra"], x0, cond, constrain_batch(sigma, mesh),
                     constrain_batch(eps, mesh), k_rng)
    loss = inject_nonfinite(loss, state.step, config)
    return state_lib.teacher_update(state, {"denoiser": optimizer}, {"denoiser": grads}, loss, batch, config)

  return step
