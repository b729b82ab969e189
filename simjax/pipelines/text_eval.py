"""Evaluation and sampling of text-to-image runs.

On digits (eval.features == 'digit_classifier') every held-out image gets eval-only phrasings of its
caption (simjax.data.digit_captions); the teacher (its guided Heun sampler on the trained noise levels)
and the one-step generator each draw eval.samples_per_prompt images per caption, and eval/final.json
reports for each source:
  frechet_distance     in the digit classifier's features, against the training split (the held-out
                       real images' own distance is the metric's floor, under 'reference');
  caption_accuracy     the classifier's digit equals the digit the caption names (a source that ignores
                       the prompt scores ~10%; mode collapse onto a few digits cannot pass), also
                       apart for digits spelled as words / written as numerals (caption_accuracy_words,
                       _numerals) and per held-out phrasing (caption_accuracy_by_phrasing);
  attribute_accuracy   the stroke thickness / slant measured on the image equals the one the caption
                       names (chance ~1/3 each), with thickness_ and slant_accuracy separately;
and the teacher's guidance sweep (eval.guidance_sweep) under 'guidance_sweep'. Without a classifier
(eval.features == 'none', e.g. PixArt) the evaluation writes captioned grids only.
"""
import time

import jax
import numpy as np
from etils import epath

from simjax import data as data_lib
from simjax.data import digit_captions
from simjax import exported, sampling, tensorboard
from simjax.diffusion import edm, samplers
from simjax.errors import UserError
from simjax.eval import fid as fid_lib
from simjax.eval import report
from simjax.pipelines import image_eval
from simjax.teachers import guidance
from simjax.training import distill
from simjax.training import sim_steps

FEATURES = ("digit_classifier", "none")


def validate(config):
  ev = config.eval
  if ev.features not in FEATURES:
    raise UserError(f"eval.features={ev.features!r} for a text-to-image run; use one of {FEATURES}.")
  if ev.features == "digit_classifier" and config.data.name != "digits":
    raise UserError("eval.features='digit_classifier' measures digits; set --config.eval.features=none for other data.")
  for name in ("samples_per_prompt", "teacher_steps", "batch_size"):
    if int(ev[name]) < 1:
      raise UserError(f"eval.{name} must be >= 1, got {ev[name]}; set --config.eval.{name}.")
  for w in tuple(ev.guidance_sweep):
    if not 0 <= float(w) < float("inf"):
      raise UserError(f"eval.guidance_sweep holds {w}; give finite weights >= 0, e.g. (1.0, 2.0, 4.0).")


def make_decoder(config):
  """latents -> images in [-1, 1]: the VAE's decoder for a latent teacher (config.vae), else a clip."""
  if not config.vae:
    return lambda x: np.clip(np.asarray(x, np.float32), -1.0, 1.0)
  from simjax.teachers.vae_checkpoints import decode_in_batches, load_vae  # pylint: disable=import-outside-toplevel
  vae = load_vae(config.vae)
  return lambda x, batch=8: np.clip(decode_in_batches(vae.decode, x, batch), -1, 1)


def grid_prompts(config):
  """The prompts of the periodic grids: digits' held-out phrasings, one per digit in turn; else none."""
  if config.teacher.kind != "train":
    return []
  from simjax.pipelines import text_teacher  # pylint: disable=import-outside-toplevel
  caps = text_teacher.caption_sets(config)["eval"]
  by_digit = [[c.text for c in caps if c.digit == d] for d in range(10)]
  n = int(config.grid_size) ** 2
  return [by_digit[i % 10][i // 10 % len(by_digit[i % 10])] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Samplers

def teacher_sigmas(module, num_steps: int, config) -> np.ndarray:
  """Karras' schedule within the teacher's trained range, each level snapped to a trained one (repeats
  dropped), then 0: Heun on the levels the discrete teacher was trained at."""
  lo = max(float(config.sigma_min), module.sigma_min)
  hi = min(float(config.sigma_max), module.sigma_max)
  karras = np.asarray(edm.karras_sigmas(num_steps, lo, hi, float(config.rho)))[:-1]
  grid = module.sigmas
  snapped = grid[np.abs(grid[None, :] - karras[:, None]).argmin(1)]
  snapped = np.unique(snapped)[::-1]
  return np.concatenate([snapped, [0.0]]).astype(np.float32)


def make_teacher_sampler(module, config, mesh, null, weight: float, num_steps: int):
  """sample(variables, cond, seed, describe) -> sampling.Samples: the guided teacher's Heun sampler on its
  trained levels, one image per row of `cond`, in global batches of eval.batch_size over the mesh."""
  sigmas = teacher_sigmas(module, num_steps, config)

  def batch(variables, z, cond):
    denoise = guidance.guided(lambda x, s, c: module.apply(variables, x, s, c), weight, null)
    return samplers.edm_sample(lambda x, s: denoise(x, s, cond), z, sigmas=sigmas, solver="heun")
  fn = jax.jit(sampling.shard_rows(batch, mesh))
  size = int(config.eval.batch_size)
  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  nfe = samplers.num_function_evals(len(sigmas) - 1)

  def sample(variables, cond, seed, describe=""):
    from simjax.conditioning import CondSpace, num_rows  # pylint: disable=import-outside-toplevel
    space = CondSpace(text_length=cond["emb"].shape[1], text_dim=cond["emb"].shape[2])
    return sampling.sample(fn, sampling.replicate(variables, mesh), num=num_rows(cond), batch_size=size, seed=seed,
                           data_shape=shape, cond_space=space, mesh=mesh, cond=cond,
                           describe=f"{describe}: teacher Heun {nfe} NFE, guidance {weight:g}")
  sample.nfe = nfe
  return sample


def _null(distillation):
  return distillation.consts.get(sim_steps.NULL_COND)


# ----------------------------------------------------------------------------------------------
# Measures

def measure(features, ref, x, captions, thresholds, *, mesh, batch_size, nfe):
  """FD, caption and attribute accuracy of images x (all rows, every process) made for `captions`."""
  share = image_eval.process_share(len(x))
  digits = np.asarray([c.digit for c in captions], np.int32)
  (mu, sigma), preds, labels = image_eval.stream_features(features, x[share], digits[share], mesh=mesh,
                                                          batch_size=batch_size)
  out = {"nfe": int(nfe), "num_samples": int(len(x)), "frechet_distance": float(fid_lib.frechet_distance(mu, sigma, *ref)),
         "caption_accuracy": float(np.mean(preds == labels))}
  # Digits named as words must be read from several bytes; a numeral is one: reported apart.
  as_word = np.asarray([digit_captions.names_as_word(c) for c in captions])[share]
  for name, rows in (("words", as_word), ("numerals", ~as_word)):
    if rows.any():
      out[f"caption_accuracy_{name}"] = float(np.mean(preds[rows] == labels[rows]))
  phrasings = np.asarray([c.phrasing for c in captions])[share]
  out["caption_accuracy_by_phrasing"] = {str(p): float(np.mean(preds[phrasings == p] == labels[phrasings == p]))
                                         for p in sorted(set(phrasings))}
  hist = np.bincount(preds, minlength=10) / len(preds)
  out["min_class_fraction"] = float(hist.min())
  thickness, slant = thresholds.label(x, digits)
  hits = []
  for name, measured in (("thickness", thickness), ("slant", slant)):
    named = np.asarray([getattr(c, name) for c in captions])
    rows = named != ""
    if rows.any():
      correct = measured[rows] == named[rows]
      out[f"{name}_accuracy"] = float(np.mean(correct))
      out[f"{name}_captions"] = int(rows.sum())
      hits.append(correct)
  if hits:
    out["attribute_accuracy"] = float(np.mean(np.concatenate(hits)))
  return out


def evaluate(config, workdir, distillation: distill.Distillation, state, encode):
  """eval/final.json's dict; writes samples/{generator,teacher}.npz (with prompts) and captioned grids."""
  nets, mesh = distillation.nets, distillation.mesh
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  batch, seed, steps = int(config.eval.batch_size), int(config.eval.seed), int(config.eval.teacher_steps)
  if config.eval.features == "none":
    return {"generator": {"nfe": 1, "step": int(jax.device_get(state.step))}}
  from simjax.pipelines import text_teacher  # pylint: disable=import-outside-toplevel
  sets = text_teacher.caption_sets(config)
  per = int(config.eval.samples_per_prompt)
  captions = [c for c in sets["eval"] for _ in range(per)]
  prompts = [c.text for c in captions]
  say(f"eval: {len(sets['eval'])} held-out captions x {per} samples, from the generator (1 NFE) and the teacher",
      flush=True)
  cond = encode(prompts)
  t0 = time.time()
  gen = distill.make_generator_sampler(nets, distillation.generator_extra, batch, mesh)(
      state.ema["generator"], len(prompts), seed, "eval: generator 1 NFE", cond=cond)
  t_gen = time.time() - t0

  train, held = data_lib.load_splits(config)
  features = image_eval.DigitFeatures(config, workdir, train)
  ref = image_eval.reference_stats(config, features, train, mesh)
  kw = dict(mesh=mesh, batch_size=batch)
  thresholds = sets["thresholds"]
  results = {"generator": measure(features, ref, np.clip(gen.x, -1, 1), captions, thresholds, nfe=1, **kw)}
  weight = guidance.weight_of(config)
  sweep = sorted(set(float(w) for w in tuple(config.eval.guidance_sweep)) | {weight})
  teacher_x, results["guidance_sweep"] = None, []
  for w in sweep:
    t0 = time.time()
    sampler = make_teacher_sampler(nets.teacher.module, config, mesh, _null(distillation), w, steps)
    x = np.clip(sampler(distillation.consts["teacher"], cond, seed + 1, "eval").x, -1, 1)
    row = measure(features, ref, x, captions, thresholds, nfe=sampler.nfe, **kw)
    row.update(guidance=w, sample_seconds=time.time() - t0)
    results["guidance_sweep"].append(row)
    if w == weight:
      results["teacher"], teacher_x = dict(row), x
  # The floor: held-out real images with their own (held-out-phrasing) captions.
  held_caps = [c for c in sets["eval"]]
  results["reference"] = measure(features, ref, held.x[sets["eval_image"]], held_caps, thresholds, nfe=0, **kw)
  g, t = results["generator"], results["teacher"]
  g.update(step=int(jax.device_get(state.step)), sample_seconds=t_gen,
           fd_ratio_to_teacher=g["frechet_distance"] / max(t["frechet_distance"], 1e-12),
           caption_accuracy_gap=t["caption_accuracy"] - g["caption_accuracy"], guidance=weight)
  gen_x = np.clip(gen.x, -1, 1)
  report.write_samples(workdir, "generator", gen_x, prompts=prompts)
  report.write_samples(workdir, "teacher", teacher_x, prompts=prompts)
  order = _one_per_digit(captions, int(config.grid_size) ** 2)
  cols = int(config.grid_size)
  report.write_png(epath.Path(workdir) / "samples" / "generator_captioned.png",
                   report.captioned_grid(gen_x[order], [prompts[i] for i in order], cols))
  report.write_png(epath.Path(workdir) / "samples" / "teacher_captioned.png",
                   report.captioned_grid(teacher_x[order], [prompts[i] for i in order], cols))
  tensorboard.scalars(workdir, "sim", g["step"], {f"eval/{k}_{m}": results[k][m] for k in ("generator", "teacher")
                                                  for m in ("frechet_distance", "caption_accuracy")})
  say("eval: " + " | ".join(f"{k}: FD={results[k]['frechet_distance']:.3f} caption acc="
                            f"{results[k]['caption_accuracy']:.3f} attr acc={results[k].get('attribute_accuracy', 0):.3f}"
                            f" nfe={results[k]['nfe']}" for k in ("generator", "teacher", "reference")), flush=True)
  say("eval: teacher guidance sweep: " + ", ".join(
      f"w={r['guidance']:g} FD={r['frechet_distance']:.3f} acc={r['caption_accuracy']:.3f}"
      for r in results["guidance_sweep"]), flush=True)
  return results


def _one_per_digit(captions, n):
  """Row indices showing each digit in turn (the captioned grids)."""
  by_digit = [[i for i, c in enumerate(captions) if c.digit == d] for d in range(10)]
  out = []
  for i in range(n):
    rows = by_digit[i % 10]
    if rows:
      out.append(rows[(i // 10) * 7 % len(rows)])
  return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------
# --mode=sample

def sample_mode(config, workdir, mesh, read_teacher):
  """Images for the prompts of config.sample.prompts: samples/sample_<source>.npz (x, prompts), one PNG per
  image in samples/prompts_<source>/ and a captioned grid samples/sample_<source>.png. read_teacher() ->
  (teacher, encode, null condition): called only for sample.source='teacher'."""
  from simjax.text import embedding_cache  # pylint: disable=import-outside-toplevel
  source, wd = config.sample.source, epath.Path(workdir)
  base = embedding_cache.read_prompts(config.sample.prompts, config.text.prompt_field)
  per = max(1, int(config.sample.per_prompt))
  prompts = [p for p in base for _ in range(per)]
  seed, batch = int(config.sample.seed), int(config.eval.batch_size)
  sampling.check_batch_size(batch, mesh)
  if source == "generator":
    path = epath.Path(config.sample.checkpoint) if config.sample.checkpoint else wd / "generator"
    generator = exported.load_generator(path)
    x = generator.sample(len(prompts), seed, prompts=prompts, batch_size=batch, mesh=mesh,
                         describe="sample: generator 1 NFE")
    nfe = 1
  else:
    teacher, encode, null = read_teacher()
    sampler = make_teacher_sampler(teacher.module, config, mesh, null, guidance.weight_of(config),
                                   int(config.eval.teacher_steps))
    x = sampler(teacher.params, encode(prompts), seed, "sample").x
    nfe = sampler.nfe
  images = make_decoder(config)(x)
  report.write_samples(workdir, f"sample_{source}", images, prompts=prompts)
  if config.vae:
    report.write_samples(workdir, f"sample_{source}_latents", np.asarray(x), prompts=prompts)
  for i, image in enumerate(images):
    report.write_png(wd / "samples" / f"prompts_{source}" / f"{i:04d}.png",
                     report.image_grid(image[None], 1, scale=max(1, 128 // image.shape[0])))
  cols = min(8, len(images))
  report.write_png(wd / "samples" / f"sample_{source}.png", report.captioned_grid(images[:64], prompts[:64], cols))
  if jax.process_index() == 0:
    print(f"wrote {len(images)} images ({nfe} NFE) for {len(base)} prompts to {wd / 'samples'}", flush=True)
  return "done"
