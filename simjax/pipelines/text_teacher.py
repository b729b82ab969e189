"""The text-to-image pipeline's trained teacher (teacher.kind == 'train', stage 1): on scikit-learn's digits,
captions generated from the data (simjax.data.digit_captions), a byte-level tokenizer, and a small T5
encoder trained jointly with a small PixArt-family transformer (epsilon loss, caption dropout to the null
caption), then frozen and exported as a user's PixArt and T5 files would be read:

  teacher/final/          a converted transformer folder (transformer_checkpoints.save_converted) with the
                          null caption (the encoder's output for '') beside its parameters;
  teacher/text_encoder/   a transformers T5EncoderModel folder (t5_checkpoints.save_text_encoder).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from simjax import data as data_lib
from simjax.errors import UserError
from simjax.networks import t5 as t5_lib
from simjax.parallel import mesh as mesh_lib
from simjax.pipelines import common
from simjax.teachers import transformer_checkpoints
from simjax.text import t5_checkpoints
from simjax.training import distill
from simjax.training import state as state_lib
from simjax.training import text_teacher_steps
from simjax.training.roles import Denoiser


def teacher_dir(workdir):
  return epath.Path(workdir) / "teacher"


def final_dir(workdir):
  return teacher_dir(workdir) / "final"


def encoder_dir(workdir):
  return teacher_dir(workdir) / "text_encoder"


def validate(config, mesh):
  if config.data.name != "digits":
    raise UserError(f"teacher.kind='train' trains the embedded text-to-image teacher on digits; got data.name="
                    f"{config.data.name!r}: set --config.data.name=digits, or teacher.kind='checkpoint' with a PixArt teacher.")
  if not 0.0 < float(config.data.holdout_fraction) < 1.0:
    raise UserError(f"data.holdout_fraction must lie in (0, 1), got {config.data.holdout_fraction}; "
                    "set --config.data.holdout_fraction (e.g. 0.2).")
  if config.text.encoder != "train":
    raise UserError("teacher.kind='train' trains its text encoder with it: set --config.text.encoder=train.")
  tt = config.teacher_train
  for name in ("batch_size", "num_steps", "log_every", "checkpoint_every"):
    if int(tt[name]) < 1:
      raise UserError(f"teacher_train.{name} must be >= 1, got {tt[name]}; set --config.teacher_train.{name}.")
  if int(config.captions.per_image) < 1 or int(config.captions.eval_per_image) < 1:
    raise UserError("captions.per_image and captions.eval_per_image must be >= 1; set --config.captions.*.")
  if not 0.0 <= float(config.captions.distractors) <= 1.0:
    raise UserError(f"captions.distractors is the fraction of training captions given made-up words and must lie in "
                    f"[0, 1], got {config.captions.distractors}; set --config.captions.distractors (e.g. 0.5).")
  if not 0.0 <= float(config.captions.word_fraction) <= 1.0:
    raise UserError(f"captions.word_fraction is the fraction of training captions that spell the digit out and must "
                    f"lie in [0, 1], got {config.captions.word_fraction}; set --config.captions.word_fraction "
                    f"(e.g. 0.5).")
  weight = float(tt.caption_digit_weight)
  if not (np.isfinite(weight) and weight >= 0.0):
    raise UserError(f"teacher_train.caption_digit_weight weighs the encoder's digit-naming loss and must be a finite "
                    f"value >= 0, got {tt.caption_digit_weight}; set --config.teacher_train.caption_digit_weight "
                    "(0 turns it off).")
  common.validate_ema(tt, "teacher_train.")
  state_lib.make_optimizer(tt.optim)
  mesh_lib.check_batch_divisible(int(tt.batch_size), mesh, "teacher_train.batch_size")
  try:
    encoder_arch(config)
    jax.eval_shape(lambda: init_networks(config, jax.random.key(0)))
  except (TypeError, ValueError) as e:
    raise UserError(f"teacher.arch / text.encoder_arch: {str(e).splitlines()[0]}; fix the sizes in the config.") from None


# ----------------------------------------------------------------------------------------------
# Captions

@functools.lru_cache(maxsize=4)
def _caption_sets(holdout_fraction: float, split_seed: int, per_image: int, eval_per_image: int, seed: int,
                  distractors: float, word_fraction: float):
  from simjax.data import digit_captions, digits  # pylint: disable=import-outside-toplevel
  train, held = digits.load_digits_splits(holdout_fraction, split_seed)
  thresholds = digit_captions.AttributeThresholds.fit(train.x, train.labels)
  out = {"thresholds": thresholds}
  for name, split, phrasing, n in (("train", train, "train", per_image), ("eval", held, "eval", eval_per_image)):
    thickness, slant = thresholds.label(split.x, split.labels)
    per = digit_captions.make_captions(split.labels, thickness, slant, split=phrasing, per_image=n, seed=seed,
                                       distractors=distractors, word_fraction=word_fraction)
    out[name] = [c for caps in per for c in caps]
    out[name + "_image"] = np.asarray([i for i, caps in enumerate(per) for _ in caps], np.int32)
  return out


def caption_sets(config):
  """{'train': [Caption], 'train_image': [M] image index, 'eval': held-out phrasings of held-out images,
  'eval_image', 'thresholds'}: deterministic in the config."""
  c = config.captions
  return _caption_sets(float(config.data.holdout_fraction), int(config.data.split_seed), int(c.per_image),
                       int(c.eval_per_image), int(c.seed), float(c.distractors),
                       float(c.word_fraction))


def training_prompts(config):
  return [c.text for c in caption_sets(config)["train"]]


# ----------------------------------------------------------------------------------------------
# Networks

def encoder_arch(config):
  from simjax.text.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel
  arch = dict(config.text.encoder_arch.to_dict())
  arch["vocab_size"] = int(load_tokenizer(config.text.tokenizer).vocab_size)
  return {k: arch[k] for k in t5_checkpoints.CONFIG_DEFAULTS}


def teacher_arch(config):
  shape = data_lib.data_shape(config)
  if shape[0] != shape[1]:
    raise ValueError(f"the trained teacher makes square images; data.shape is {shape}")
  arch = dict(config.teacher.arch.to_dict())
  arch.update(sample_size=shape[0], in_channels=shape[2], out_channels=shape[2], adaln="single",
              caption_channels=int(config.text.encoder_arch.d_model), pixels_per_latent=1)
  return arch


def schedule(config):
  return dict(config.teacher.schedule.to_dict())


def init_networks(config, key):
  """{'denoiser': the DiscreteVPPrecond's params, 'encoder': T5's, and the digit head's when
  teacher_train.caption_digit_weight > 0} at step 0."""
  length, shape = int(config.text.max_length), data_lib.data_shape(config)
  module = transformer_checkpoints.build_teacher_module(teacher_arch(config), schedule(config))
  encoder = t5_lib.T5Encoder(**encoder_arch(config))
  k_d, k_e = jax.random.split(key)
  d_model = int(config.text.encoder_arch.d_model)
  cond = {"emb": jnp.zeros((1, length, d_model)), "mask": jnp.ones((1, length))}
  denoiser = module.init(k_d, jnp.zeros((1,) + shape), jnp.ones((1,)), cond)["params"]
  enc = encoder.init(k_e, jnp.zeros((1, length), jnp.int32), jnp.ones((1, length)))["params"]
  params = {"denoiser": denoiser, "encoder": enc}
  if text_teacher_steps.DIGIT_HEAD in text_teacher_steps.trained_networks(config.teacher_train):
    head = text_teacher_steps.digit_head().init(jax.random.fold_in(key, 2), jnp.zeros((1, d_model)))["params"]
    params[text_teacher_steps.DIGIT_HEAD] = head
  return params


# ----------------------------------------------------------------------------------------------
# Training

def train(config, workdir, mesh):
  """Trains tokenizer-fed T5 + transformer together (resumable); exports both EMAs. Returns the status."""
  if (final_dir(workdir) / "arch.json").exists() and (encoder_dir(workdir) / "config.json").exists():
    return "done"
  from simjax.text.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel
  tt = config.teacher_train
  arch, sched = teacher_arch(config), schedule(config)
  module = transformer_checkpoints.build_teacher_module(arch, sched)
  encoder = t5_lib.T5Encoder(**encoder_arch(config))
  sets = caption_sets(config)
  train_split, _ = data_lib.load_splits(config)
  tokenizer = load_tokenizer(config.text.tokenizer)
  length = int(config.text.max_length)
  ids, mask = tokenizer([c.text for c in sets["train"]], length)
  null_ids, null_mask = tokenizer([""], length)
  optimizer = state_lib.make_optimizer(tt.optim)
  networks = text_teacher_steps.trained_networks(tt)
  optimizers = {k: optimizer for k in networks}
  checkpointer, writer = common.open_stage(config, workdir, stage="teacher/checkpoints",
                                           metrics_file="teacher/metrics.jsonl", interval=int(tt.checkpoint_every),
                                           name="teacher")
  try:
    teacher_dir(workdir).mkdir(parents=True, exist_ok=True)
    state, shardings, specs = distill.setup_state(
        optimizers, config, mesh, checkpointer, init_fn=lambda: jax.jit(lambda k: init_networks(config, k))(
            jax.random.key(int(tt.seed))), ema_names=networks)
    digits = np.asarray([c.digit for c in sets["train"]], np.int32)
    consts = jax.device_put({"data": train_split.x, "caption_image": sets["train_image"], "caption_digit": digits,
                             "tokens": ids, "token_mask": mask, "null_tokens": null_ids[0], "null_mask": null_mask[0],
                             "extra": {}},
                            mesh_lib.replicated(mesh))
    step = text_teacher_steps.make_text_teacher_step(
        Denoiser(module), encoder, _step_config(config), mesh, specs.params, optimizers, sigmas=module.sigmas,
        num_captions=len(sets["train"]))
    state, status = common.run_teacher_stage(config, step, state, shardings, consts, checkpointer, writer,
                                             "text teacher step")
  finally:
    checkpointer.close()
  if status == "done" and jax.process_index() == 0:
    ema = jax.device_get(state.ema)
    null = text_teacher_steps.null_caption(encoder, ema["encoder"], jnp.asarray(null_ids[0]),
                                           jnp.asarray(null_mask[0], jnp.float32))
    t5_checkpoints.save_text_encoder(encoder_dir(workdir), encoder_arch(config), ema["encoder"])
    if final_dir(workdir).exists():  # an export interrupted before the encoder's: written again whole
      final_dir(workdir).rmtree()
    transformer_checkpoints.save_converted(final_dir(workdir), arch, sched, {"params": ema["denoiser"]["model"]},
                                           null_caption=np.asarray(null))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("simjax text teacher export")
  return status


def _step_config(config):
  tt = config.teacher_train.to_dict()
  tt.update(debug=config.debug.to_dict())
  return ml_collections.ConfigDict(tt)
