"""The text-to-image pipeline: SIM distillation of a text-conditioned transformer (PixArt-alpha's family,
epsilon prediction on discrete timesteps) into a one-step generator, from prompts only (no images).

Stages, each resumable from the workdir:
  teacher/      teacher.kind == 'train' (the embedded digits default): a T5 encoder and the transformer trained
                together (text_teacher.py), exported to teacher/final/ (the transformer and its null caption) and
                teacher/text_encoder/ (a transformers T5 folder); teacher.kind == 'checkpoint': a user's PixArt /
                DiT files, read in place;
  embeddings/   the training prompts tokenized and encoded once (simjax.text.embedding_cache; text.cache_dir),
                so no text encoder is in memory while distilling;
  checkpoints/  SIM: generator and fake score start as copies of the teacher; the generator's conditions are
                drawn from the cached embeddings (all of them, or windows streamed from the shards); the guided
                teacher contrasts with the checkpoint's null caption; every loss's noise level lies on the
                teacher's trained grid;
  generator/    the EMA generator (a converted transformer folder) with sigma_init and how its prompts are encoded;
  eval/         digits: Frechet distance in the digit classifier's features, caption and attribute accuracy on
                held-out phrasings, the teacher's guidance sweep (text_eval.py).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from simjax import draws
from simjax import data as data_lib
from simjax import exported, storage, tensorboard
from simjax.conditioning import CondSpace
from simjax.errors import UserError
from simjax.eval import report
from simjax.parallel import mesh as mesh_lib
from simjax.pipelines import common, text_eval, text_teacher
from simjax.teachers import guidance, transformer_checkpoints
from simjax.text import embedding_cache
from simjax.training import distill
from simjax.training import sim_steps
from simjax.training import state as state_lib
from simjax.training.roles import Denoiser, DistillNetworks

MODES = ("train_and_eval", "train", "train_teacher", "eval", "sample")
NULL_FILE = "null_caption.npz"


def validate(config, mode):
  if mode not in MODES:
    raise UserError(f"mode {mode!r} is not available for the text_to_image pipeline; use one of {MODES}.")
  shape = data_lib.data_shape(config)
  mesh = common.validate_common(config, int(np.prod(shape)))
  common.refuse_edm2_settings(config, teacher_optim=True)
  guidance.check_config(config)
  mesh_lib.check_batch_divisible(int(config.eval.batch_size), mesh, "eval.batch_size")
  if len(shape) != 3:
    raise UserError(f"data.shape must be (H, W, C) (the latent shape for a latent teacher), got {shape}.")
  if sim_steps.discriminator_needed(config, int(np.prod(shape))):
    raise UserError("text-to-image distillation is data-free: set --config.adversarial.weight=0 and a loss that needs "
                    "no discriminator (sim, sid, dmd, diff_instruct, uni_instruct with loss.f=reverse_kl).")
  if config.teacher.null not in ("checkpoint", "empty_prompt"):
    raise UserError(f"teacher.null={config.teacher.null!r}; use 'checkpoint' (the null caption the teacher file "
                    "holds, e.g. PixArt's learned one) or 'empty_prompt' (the text encoder's output for '').")
  text = config.text
  for name in ("max_length", "shard_size", "encode_batch_size"):
    if int(text[name]) < 1:
      raise UserError(f"text.{name} must be >= 1, got {text[name]}; set --config.text.{name}.")
  if int(text.pool_shards) < 0 or (int(text.pool_shards) and int(text.pool_every) < 1):
    raise UserError("text.pool_shards must be >= 0 (0: every cached prompt is in the pool) and text.pool_every >= 1; "
                    "set --config.text.pool_shards / --config.text.pool_every.")
  if text.cache_dtype not in ("float16", "bfloat16", "float32"):
    raise UserError(f"text.cache_dtype={text.cache_dtype!r}; use 'float16', 'bfloat16' or 'float32'.")
  _check_path(text.tokenizer, "text.tokenizer", "'byte' or a spiece.model / tokenizer folder / pipeline root",
              allow=("byte",))
  if config.teacher.kind == "train":
    text_teacher.validate(config, mesh)
  elif config.teacher.kind == "checkpoint":
    _check_path(config.teacher.checkpoint, "teacher.checkpoint", "a PixArt/DiT diffusers folder, an original .pth or "
                "a `python -m simjax.convert_transformer` folder")
    path = epath.Path(config.teacher.checkpoint)
    if not (transformer_checkpoints.is_transformer_checkpoint(path) or path.suffix in (".pth", ".pt")):
      raise UserError(f"teacher.checkpoint {path} is not a PixArt/DiT checkpoint (a diffusers pipeline or transformer "
                      "folder, an original .pth/.pt, or a `python -m simjax.convert_transformer` folder).")
    _check_path(text.encoder, "text.encoder", "a transformers T5 folder or a diffusers pipeline root")
    if not text.prompts and mode in ("train_and_eval", "train"):
      raise UserError("a text-to-image distillation needs prompts: set --config.text.prompts to a .txt / .jsonl file "
                      "or tfds:NAME/SPLIT.")
  else:
    raise UserError(f"unknown teacher.kind {config.teacher.kind!r}; use 'train' or 'checkpoint'.")
  if text.prompts and not str(text.prompts).startswith("tfds:"):
    _check_path(text.prompts, "text.prompts", "a .txt (one prompt per line) or .jsonl file, or tfds:NAME/SPLIT")
  if config.vae:
    _check_path(config.vae, "vae", "a diffusers AutoencoderKL folder or pipeline root (its vae/)")
  if mode == "sample":
    if not config.sample.prompts:
      raise UserError("--mode=sample of a text-to-image run needs prompts: set --config.sample.prompts=FILE.")
    _check_path(config.sample.prompts, "sample.prompts", "a .txt (one prompt per line) or .jsonl file")
    if config.sample.source not in ("generator", "teacher"):
      raise UserError(f"unknown sample.source {config.sample.source!r}; use 'generator' or 'teacher'.")
  text_eval.validate(config)


def _check_path(path, name, what, allow=()):
  if path in allow:
    return
  if not path or not epath.Path(path).exists():
    raise UserError(f"{name} {path!r} not found; set --config.{name} to {what}.")


# ----------------------------------------------------------------------------------------------
# Where things are

def teacher_path(config, workdir):
  return text_teacher.final_dir(workdir) if config.teacher.kind == "train" else epath.Path(config.teacher.checkpoint)


def encoder_path(config, workdir):
  return text_teacher.encoder_dir(workdir) if config.teacher.kind == "train" else epath.Path(config.text.encoder)


def cache_dir(config, workdir):
  return epath.Path(config.text.cache_dir) if config.text.cache_dir else epath.Path(workdir) / "embeddings"


def training_prompts(config):
  """The prompts the generator is distilled on: the digits' training captions, or config.text.prompts."""
  if config.teacher.kind == "train" and not config.text.prompts:
    return text_teacher.training_prompts(config)
  return embedding_cache.read_prompts(config.text.prompts, config.text.prompt_field, config.text.data_dir)


def load_tokenizer(config):
  from simjax.text.tokenizers import load_tokenizer as load  # pylint: disable=import-outside-toplevel
  return load(config.text.tokenizer)


class PromptEncoder:
  """prompts -> text conditions {'emb', 'mask'} with the run's tokenizer and (frozen) encoder."""

  def __init__(self, config, workdir, path=None):
    from simjax.text.t5_checkpoints import load_text_encoder  # pylint: disable=import-outside-toplevel
    self.path = epath.Path(path) if path else encoder_path(config, workdir)
    self.tokenizer = load_tokenizer(config)
    self.encoder = load_text_encoder(str(self.path))
    self.max_length = int(config.text.max_length)
    self.batch = int(config.text.encode_batch_size)

  def encode_fn(self, ids, mask):
    return self.encoder.encode(ids, mask)

  def __call__(self, prompts):
    embs, masks = [], []
    for i in range(0, len(prompts), self.batch):
      chunk = list(prompts[i:i + self.batch])
      ids, mask = self.tokenizer(chunk + [""] * (self.batch - len(chunk)), self.max_length)  # one compiled shape
      embs.append(np.asarray(self.encoder.encode(ids, mask))[:len(chunk)])
      masks.append(mask[:len(chunk)])
    return {"emb": np.concatenate(embs).astype(np.float32), "mask": np.concatenate(masks).astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# Stage 2: the embedding cache

def build_embeddings(config, workdir):
  """Encodes the training prompts once into the cache (resumable, split over processes), and the empty
  prompt's embedding beside it (the null caption where teacher.null == 'empty_prompt')."""
  out = cache_dir(config, workdir)
  prompts = training_prompts(config)
  encoder = None
  if not embedding_cache.is_complete(out) or not (out / NULL_FILE).exists():
    encoder = PromptEncoder(config, workdir)
    if jax.process_index() == 0:
      print(f"embedding {len(prompts)} prompts with the text encoder at {encoder.path} into {out}", flush=True)
    embedding_cache.build_cache(prompts, encoder.encode_fn, encoder.tokenizer, out,
                                max_length=int(config.text.max_length), shard_size=int(config.text.shard_size),
                                batch_size=int(config.text.encode_batch_size), dtype=str(config.text.cache_dtype),
                                encoder_id=str(encoder.path))
    null = encoder([""])
    if jax.process_index() == 0:
      storage.atomic_write_npz(out / NULL_FILE, emb=null["emb"][0], mask=null["mask"][0])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("simjax embedding cache")
  if not embedding_cache.is_complete(out):
    raise UserError(f"the embedding cache {out} is incomplete after encoding; rerun to finish it.")
  del encoder  # the text encoder leaves memory before the distillation starts
  return out


def null_condition(config, teacher, cache):
  """The null caption the guided teacher contrasts with, one row {'emb': [L, D], 'mask': [L]}."""
  if config.teacher.null == "checkpoint":
    if teacher.null_cond is None:
      raise UserError(f"teacher {teacher_path_of(teacher)} holds no null caption; set --config.teacher.null="
                      "empty_prompt (the text encoder's output for '').")
    null = {k: np.asarray(v, np.float32) for k, v in teacher.null_cond.items()}
  else:
    with (epath.Path(cache) / NULL_FILE).open("rb") as f:
      data = np.load(f)
      null = {"emb": np.asarray(data["emb"], np.float32), "mask": np.asarray(data["mask"], np.float32)}
  return null


def teacher_path_of(teacher):
  return teacher.arch.get("_path", "")


# ----------------------------------------------------------------------------------------------
# Stage 3: SIM distillation

def read_teacher(config, workdir):
  path = teacher_path(config, workdir)
  runtime = {k: v for k, v in dict(config.teacher.runtime).items() if v}
  teacher = transformer_checkpoints.load_teacher(str(path), arch=runtime or None)
  teacher.arch["_path"] = str(path)
  got = (teacher.img_resolution, teacher.img_resolution, teacher.img_channels)
  if got != data_lib.data_shape(config):
    raise UserError(f"teacher {path} makes {got} samples but config.data.shape is {data_lib.data_shape(config)}; "
                    "set --config.data.shape to the teacher's (latent) shape.")
  if not int(teacher.arch.get("caption_channels", 0)):
    raise UserError(f"teacher {path} is not text-conditioned (a class-label DiT?); the text_to_image pipeline "
                    "distils PixArt-family teachers.")
  return teacher


def guided_teacher_parts(config, workdir):
  """(teacher, prompt encoder, null condition) for sampling the guided teacher outside a distillation."""
  teacher = read_teacher(config, workdir)
  encode = PromptEncoder(config, workdir)
  if config.teacher.null == "checkpoint":
    null = null_condition(config, teacher, cache_dir(config, workdir))
  else:
    null = jax.tree.map(lambda a: a[0], encode([""]))
  return teacher, encode, null


def build_distillation(config, workdir, mesh, cache):
  teacher = read_teacher(config, workdir)
  manifest = embedding_cache.read_manifest(cache)
  if int(manifest["text_dim"]) != int(teacher.arch["caption_channels"]):
    raise UserError(f"the embeddings in {cache} are {manifest['text_dim']} wide but the teacher reads "
                    f"{teacher.arch['caption_channels']}: encode the prompts with the teacher's text encoder "
                    "(--config.text.encoder) into a new --config.text.cache_dir.")
  module = teacher.module
  params = teacher.params["params"]
  space = CondSpace(text_length=int(manifest["max_length"]), text_dim=int(manifest["text_dim"]))
  nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                         data_shape=data_lib.data_shape(config), cond_space=space,
                         sigma_init=float(config.sigma_init), sigma_grid=tuple(float(s) for s in module.sigmas))
  window, every = None, 0
  consts = {"teacher": dict(teacher.params), "generator": {}, "fake": {},
            sim_steps.NULL_COND: null_condition(config, teacher, cache)}
  if int(config.text.pool_shards):
    windows = embedding_cache.CacheWindows(str(cache), int(config.text.pool_shards), int(config.seed))
    window, every = (lambda w: windows.window(w)[0]), int(config.text.pool_every)
  else:
    consts["cond_pool"], _ = embedding_cache.load_cache(str(cache))
  return distill.Distillation(
      mesh=mesh, nets=nets, arch={**{k: v for k, v in teacher.arch.items() if not k.startswith("_")}},
      consts=consts, init_fn=lambda: {"generator": params, "fake": params},
      optimizers={"generator": state_lib.make_optimizer(config.optim.generator),
                  "fake": state_lib.make_optimizer(config.optim.fake)},
      cond_pool_window=window, pool_every=every)


def export_generator(workdir, distillation: distill.Distillation, state, config):
  """generator/: the EMA generator as a converted transformer folder, and generator.json (sigma_init, the step,
  the text condition's shape and the tokenizer / encoder that make it)."""
  if jax.process_index() != 0:
    return
  arch = dict(distillation.arch)
  schedule = {k: arch.pop(k) for k in transformer_checkpoints.SCHEDULE_DEFAULTS if k in arch}
  space = distillation.nets.cond_space
  info = {"sigma_init": float(config.sigma_init), "nfe": 1, "step": int(jax.device_get(state.step)),
          "latent": bool(config.vae),
          "text": {"length": space.text_length, "dim": space.text_dim, "tokenizer": str(config.text.tokenizer),
                   "encoder": str(encoder_path(config, workdir)), "max_length": int(config.text.max_length)}}
  params = jax.device_get(state.ema["generator"])["model"]
  if arch.get("scan_blocks"):
    from simjax.networks.dit import unstack_blocks  # pylint: disable=import-outside-toplevel
    params = unstack_blocks(params, int(arch["depth"]))
  # A continued run replaces its earlier export whole.
  with storage.staged_directory(epath.Path(workdir) / "generator", replace=True) as staging:
    transformer_checkpoints.write_converted(staging, arch, schedule, {"params": params})
    report.write_json(staging / exported.INFO_FILE, info)


def grid_hook(config, workdir, distillation: distill.Distillation, prompts, encode):
  """Every config.grid_every steps: the EMA generator on fixed prompts and noise, captioned, in samples/."""
  nets, extra = distillation.nets, distillation.generator_extra
  n = min(int(config.grid_size) ** 2, len(prompts))
  shown = list(prompts[:n])
  cond = jax.tree.map(jnp.asarray, encode(shown))
  z = draws.normal(jax.random.key(int(config.eval.seed) + 7), (n,) + nets.data_shape, jnp.float32)
  gen = jax.jit(lambda p: nets.generate(p, extra, z, cond))
  decode = text_eval.make_decoder(config)

  def hook(step, state):
    x = decode(np.asarray(jax.device_get(gen(state.ema["generator"]))))
    grid = report.captioned_grid(x, shown, int(config.grid_size))
    report.write_png(epath.Path(workdir) / "samples" / f"grid_step{step:07d}.png", grid)
    tensorboard.image(workdir, "sim", step, "samples/generator_grid", grid)
  return hook


def grid_prompts(config, prompts):
  """Prompts shown in the periodic grids: the eval prompts where the run has them, else the first training ones."""
  held = text_eval.grid_prompts(config)
  return held if held else list(prompts)


# ----------------------------------------------------------------------------------------------
# Entry

def run(config, workdir, mode="train_and_eval"):
  mesh = mesh_lib.make_mesh(config.mesh_shape)
  timings = {}
  if mode == "sample":
    return text_eval.sample_mode(config, workdir, mesh, lambda: guided_teacher_parts(config, workdir))
  if config.teacher.kind == "train" and mode in ("train_and_eval", "train", "train_teacher"):
    t0 = time.time()
    if text_teacher.train(config, workdir, mesh) != "done":
      return "preempted"
    timings["teacher_train_seconds"] = time.time() - t0
    if mode == "train_teacher":
      return "done"
  t0 = time.time()
  cache = build_embeddings(config, workdir)
  timings["embedding_seconds"] = time.time() - t0
  distillation = build_distillation(config, workdir, mesh, cache)

  def make_hooks():
    shown = grid_prompts(config, embedding_cache.load_cache(str(cache), shards=[0])[1])
    # The grid's prompts are encoded once, here; the encoder is not kept while distilling.
    return [(int(config.grid_every), grid_hook(config, workdir, distillation, shown, PromptEncoder(config, workdir)))]
  return common.distill_and_evaluate(
      config, workdir, distillation, mode, timings=timings, make_hooks=make_hooks,
      export=lambda state: export_generator(workdir, distillation, state, config),
      evaluate=lambda state: text_eval.evaluate(config, workdir, distillation, state, PromptEncoder(config, workdir)))
