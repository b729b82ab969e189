"""A text-conditioned teacher trained with its text encoder (the embedded text-to-image default) as one
pure, jittable step: DDPM's epsilon loss on the teacher's trained timesteps, caption dropout to the null
caption, T5 encoder and transformer updated together.

As in teacher_steps, the data (images, every caption's tokens and the image each describes) sits on the
devices and each step gathers a global batch drawn from fold_in(base_key, step). The denoiser is the
discrete-VP wrapper D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t), so at sigma = sigma_t the
epsilon loss |eps_hat - eps|^2 with eps_hat = (x - D) / sigma is DDPM's, on the integers t it was trained on.
The null caption is the encoder's output for the empty prompt under an all-ones mask, PixArt's convention
for its learned null embedding, so guidance later queries exactly what the dropped rows saw.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simjax import draws
from simjax.parallel import mesh as mesh_lib
from simjax.training import state as state_lib
from simjax.training.roles import Denoiser
from simjax.training.sim_steps import average_grads, constrain_batch, device_index, inject_nonfinite

NETWORKS = ("denoiser", "encoder")


def null_caption(encoder, encoder_params, null_ids, null_mask):
  """The null text condition's embedding [L, D]: the encoder's output for the empty prompt."""
  return encoder.apply({"params": encoder_params}, null_ids[None], null_mask[None])[0]


def make_text_teacher_step(denoiser: Denoiser, encoder, config, mesh, specs, optimizers, *, sigmas, num_captions: int):
  """Builds step(state, consts) -> (state, metrics).

  consts = {'data': images [N, ...], 'caption_image': [M] int32 (the image caption m describes), 'tokens': [M, L]
  int32, 'token_mask': [M, L], 'null_tokens': [L] int32, 'null_mask': [L], 'extra': {}}. `sigmas`: the teacher's
  sigma_t, t = 0..T-1. config: the `teacher_train` section (batch_size, seed, caption_dropout, ema_*).
  """
  batch = int(config.batch_size)
  mesh_lib.check_batch_divisible(batch, mesh, "teacher_train.batch_size")
  base_key = jax.random.key(int(config.seed))
  dropout = float(config.caption_dropout)
  table = jnp.asarray(sigmas, jnp.float32)

  def local(params, extra, x0, ids, mask, drop, null_ids, null_mask, sigma, eps, rng):
    rng = jax.random.fold_in(rng, device_index(mesh))

    def loss_fn(p_local):
      p = {k: mesh_lib.gather_params(p_local[k], specs[k]) for k in NETWORKS}
      emb = encoder.apply({"params": p["encoder"]}, ids, mask)
      null = null_caption(encoder, p["encoder"], null_ids, null_mask)
      keep = (drop < 0.5)[:, None]
      cond = {"emb": jnp.where(keep[..., None], emb, null[None]), "mask": jnp.where(keep, mask, 1.0)}
      s = sigma[:, None, None, None]
      x = x0 + s * eps
      denoised = denoiser.apply(p["denoiser"], extra, x, sigma, cond, train=True, rng=rng)
      return jnp.mean(jnp.square((x - denoised) / s - eps))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    grads = {k: average_grads(grads[k], specs[k], mesh) for k in NETWORKS}
    return jax.lax.pmean(loss, mesh_lib.BATCH_AXES), grads

  def step(state: state_lib.TrainState, consts):
    key = jax.random.fold_in(base_key, state.step)
    k_idx, k_t, k_eps, k_drop, k_rng = jax.random.split(key, 5)
    idx = jax.random.randint(k_idx, (batch,), 0, num_captions)
    x0 = consts["data"][consts["caption_image"][idx]].astype(jnp.float32)
    ids, mask = consts["tokens"][idx], consts["token_mask"][idx].astype(jnp.float32)
    drop = (jax.random.uniform(k_drop, (batch,)) < dropout).astype(jnp.float32)
    sigma = table[jax.random.randint(k_t, (batch,), 0, table.shape[0])]
    eps = draws.normal(k_eps, x0.shape, jnp.float32)
    rows = constrain_batch((x0, ids, mask, drop, sigma, eps), mesh)
    x0, ids, mask, drop, sigma, eps = rows
    params_specs = {k: specs[k] for k in NETWORKS}
    fn = jax.shard_map(local, mesh=mesh, check_vma=False,
                       in_specs=(params_specs, P(), *mesh_lib.batch_specs((x0, ids, mask, drop)), P(), P(),
                                 *mesh_lib.batch_specs((sigma, eps)), P()),
                       out_specs=(P(), params_specs))
    loss, grads = fn({k: state.params[k] for k in NETWORKS}, consts["extra"], x0, ids, mask, drop,
                     consts["null_tokens"], consts["null_mask"].astype(jnp.float32), sigma, eps, k_rng)
    loss = inject_nonfinite(loss, state.step, config)
    return state_lib.teacher_update(state, optimizers, grads, loss, batch, config)

  return step
