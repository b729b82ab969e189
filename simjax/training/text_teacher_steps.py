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
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from simjax import draws
from simjax.parallel import mesh as mesh_lib
from simjax.training import state as state_lib
from simjax.training.roles import Denoiser
from simjax.training.sim_steps import average_grads, constrain_batch, device_index, inject_nonfinite

NETWORKS = ("denoiser", "encoder")
DIGIT_HEAD = "caption_digit_head"  # the auxiliary reader of teacher_train.caption_digit_weight; never exported
NUM_DIGITS = 10


def trained_networks(config):
  """The parameter sets the step trains: NETWORKS, plus the digit head when teacher_train.caption_digit_weight > 0."""
  return NETWORKS + ((DIGIT_HEAD,) if float(config.caption_digit_weight) > 0 else ())


def digit_head():
  return nn.Dense(NUM_DIGITS, name="readout")


def caption_digit_logits(head_params, emb, mask):
  """The digit head on the encoder's output mean-pooled over the caption's tokens: logits [N, 10]."""
  m = mask[..., None]
  pooled = jnp.sum(emb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return digit_head().apply({"params": head_params}, pooled)


def null_caption(encoder, encoder_params, null_ids, null_mask):
  """The null text condition's embedding [L, D]: the encoder's output for the empty prompt."""
  return encoder.apply({"params": encoder_params}, null_ids[None], null_mask[None])[0]


def make_text_teacher_step(denoiser: Denoiser, encoder, config, mesh, specs, optimizers, *, sigmas, num_captions: int):
  """Builds step(state, consts) -> (state, metrics).

  consts = {'data': images [N, ...], 'caption_image': [M] int32 (the image caption m describes), 'caption_digit':
  [M] int32 (the digit it names), 'tokens': [M, L] int32, 'token_mask': [M, L], 'null_tokens': [L] int32,
  'null_mask': [L], 'extra': {}}. `sigmas`: the teacher's sigma_t, t = 0..T-1. config: the `teacher_train`
  section (batch_size, seed, caption_dropout, caption_digit_weight, ema_*).

  With caption_digit_weight w > 0 the loss adds w times the cross-entropy of the digit head on every row's
  caption (dropped rows too: the head reads the caption, not what the denoiser saw); its gradient reaches the
  encoder and the head only. Metrics then carry `caption_digit_loss` and `caption_digit_accuracy`.
  """
  batch = int(config.batch_size)
  mesh_lib.check_batch_divisible(batch, mesh, "teacher_train.batch_size")
  base_key = jax.random.key(int(config.seed))
  dropout = float(config.caption_dropout)
  table = jnp.asarray(sigmas, jnp.float32)
  digit_weight = float(config.caption_digit_weight)
  networks = trained_networks(config)

  def local(params, extra, x0, ids, mask, drop, digit, null_ids, null_mask, sigma, eps, rng):
    rng = jax.random.fold_in(rng, device_index(mesh))

    def loss_fn(p_local):
      p = {k: mesh_lib.gather_params(p_local[k], specs[k]) for k in networks}
      emb = encoder.apply({"params": p["encoder"]}, ids, mask)
      null = null_caption(encoder, p["encoder"], null_ids, null_mask)
      keep = (drop < 0.5)[:, None]
      cond = {"emb": jnp.where(keep[..., None], emb, null[None]), "mask": jnp.where(keep, mask, 1.0)}
      s = sigma[:, None, None, None]
      x = x0 + s * eps
      denoised = denoiser.apply(p["denoiser"], extra, x, sigma, cond, train=True, rng=rng)
      loss = jnp.mean(jnp.square((x - denoised) / s - eps))
      if not digit_weight:
        return loss, {}
      logits = caption_digit_logits(p[DIGIT_HEAD], emb, mask)
      ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, digit))
      hit = jnp.mean((jnp.argmax(logits, axis=-1) == digit).astype(jnp.float32))
      return loss + digit_weight * ce, {"caption_digit_loss": ce, "caption_digit_accuracy": hit}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = {k: average_grads(grads[k], specs[k], mesh) for k in networks}
    return jax.lax.pmean((loss, aux), mesh_lib.BATCH_AXES), grads

  def step(state: state_lib.TrainState, consts):
    key = jax.random.fold_in(base_key, state.step)
    k_idx, k_t, k_eps, k_drop, k_rng = jax.random.split(key, 5)
    idx = jax.random.randint(k_idx, (batch,), 0, num_captions)
    x0 = consts["data"][consts["caption_image"][idx]].astype(jnp.float32)
    ids, mask = consts["tokens"][idx], consts["token_mask"][idx].astype(jnp.float32)
    digit = consts["caption_digit"][idx]
    drop = (jax.random.uniform(k_drop, (batch,)) < dropout).astype(jnp.float32)
    sigma = table[jax.random.randint(k_t, (batch,), 0, table.shape[0])]
    eps = draws.normal(k_eps, x0.shape, jnp.float32)
    rows = constrain_batch((x0, ids, mask, drop, digit, sigma, eps), mesh)
    x0, ids, mask, drop, digit, sigma, eps = rows
    params_specs = {k: specs[k] for k in networks}
    fn = jax.shard_map(local, mesh=mesh, check_vma=False,
                       in_specs=(params_specs, P(), *mesh_lib.batch_specs((x0, ids, mask, drop, digit)), P(), P(),
                                 *mesh_lib.batch_specs((sigma, eps)), P()),
                       out_specs=((P(), P()), params_specs))
    (loss, aux), grads = fn({k: state.params[k] for k in networks}, consts["extra"], x0, ids, mask, drop, digit,
                            consts["null_tokens"], consts["null_mask"].astype(jnp.float32), sigma, eps, k_rng)
    loss = inject_nonfinite(loss, state.step, config)
    state, metrics = state_lib.teacher_update(state, optimizers, grads, loss, batch, config)
    return state, {**metrics, **aux}

  return step
