"""Evaluation and sampling for image runs: Frechet distances, class histograms, sample files and grids.

Feature spaces: 'digit_classifier' (a small classifier trained deterministically on the training
split; the digits analogue of FID) or 'inception' (FID Inception-v3 from a user-given .pth).
Sources (eval/final.json): the one-step EMA generator, the teacher's Heun sampler, and a held-out
real sample (the metric's floor).
"""
import json
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from simjax.diffusion import samplers
from simjax.errors import UserError
from simjax.eval import fid as fid_lib
from simjax.eval import report
from simjax.teachers import edm as edm_teachers
from simjax.training import distill
from simjax.training.networks import Denoiser, DistillNetworks, split_variables


# ----------------------------------------------------------------------------------------------
# Feature spaces

class DigitFeatures:
  """The digit classifier's penultimate features; trained once per workdir and cached."""

  def __init__(self, config, workdir, train_split):
    from simjax.eval import digit_classifier as dc  # pylint: disable=import-outside-toplevel
    path = epath.Path(workdir) / "eval" / "digit_classifier.msgpack"
    cfg = config.eval.classifier
    template = dc.DigitClassifier(int(cfg.features)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    if path.exists():
      params = flax.serialization.from_bytes(template, path.read_bytes())
    else:
      params = dc.train_classifier(train_split.x, train_split.labels, steps=int(cfg.steps), seed=int(cfg.seed),
                                   features=int(cfg.features))
      if jax.process_index() == 0:
        report._atomic_write_bytes(path, flax.serialization.to_bytes(jax.device_get(params)))  # pylint: disable=protected-access
    self.fn = dc.make_feature_fn(params, int(cfg.features))
    self.has_classes = True

  def __call__(self, images):
    return self.fn(images)


class InceptionFeatures:
  """FID Inception-v3 pool3 features of images in [-1, 1] (mapped to [0, 1])."""

  def __init__(self, config):
    from simjax.eval import inception  # pylint: disable=import-outside-toplevel
    variables = inception.load_fid_inception(config.eval.inception_path)
    self.fn = inception.make_inception_feature_fn(variables)
    self.batch = int(config.eval.batch_size)
    self.has_classes = False

  def __call__(self, images):
    feats = [np.asarray(self.fn(jnp.asarray((images[i:i + self.batch] + 1.0) / 2.0)), np.float64)
             for i in range(0, len(images), self.batch)]
    return np.concatenate(feats), None


def make_features(config, workdir, train_split):
  kind = config.eval.features
  if kind == "digit_classifier":
    return DigitFeatures(config, workdir, train_split)
  if kind == "inception":
    return InceptionFeatures(config)
  raise UserError(f"unknown eval.features {kind!r}; use 'digit_classifier' or 'inception'.")


def reference_stats(config, features, train_split):
  if config.eval.get("fid_ref"):
    return fid_lib.load_reference_stats(config.eval.fid_ref)
  f, _ = features(train_split.x)
  return fid_lib.feature_statistics(f)


# ----------------------------------------------------------------------------------------------
# Samples

def teacher_samples(module, variables, num, batch, seed, label_dim, config):
  """The teacher's Heun sampler (config.eval.teacher_steps, 2n-1 NFE), in batches; (x, labels)."""
  def denoise(p, x, s):
    v, labels = p
    return module.apply(v, x, s, labels)

  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  sample = samplers.make_stepwise_sampler(denoise, num_steps=int(config.eval.teacher_steps),
                                          sigma_min=float(config.sigma_min), sigma_max=float(config.sigma_max),
                                          rho=float(config.rho))
  xs, ls = [], []
  base = jax.random.key(seed)
  for i in range(-(-num // batch)):
    k_z, k_l = jax.random.split(jax.random.fold_in(base, i))
    z = jax.random.normal(k_z, (batch,) + shape, jnp.float32)
    labels = (jax.nn.one_hot(jax.random.randint(k_l, (batch,), 0, label_dim), label_dim) if label_dim else None)
    x = sample((variables, labels), z)
    xs.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
    ls.append(None if labels is None else np.asarray(labels))
  x = np.concatenate(xs)[:num]
  return x, (None if ls[0] is None else np.concatenate(ls)[:num])


def _labels_to_int(labels):
  return None if labels is None else np.argmax(labels, -1).astype(np.int32)


def measure(features, ref_stats, x, labels, nfe, num_classes):
  f, preds = features(x)
  mu, sigma = fid_lib.feature_statistics(f)
  out = {"nfe": nfe, "frechet_distance": float(fid_lib.frechet_distance(mu, sigma, *ref_stats)),
         "num_samples": int(len(x))}
  if preds is not None:
    hist = np.bincount(preds, minlength=num_classes) / len(preds)
    out["class_histogram"] = hist.tolist()
    out["min_class_fraction"] = float(hist.min())
    if labels is not None:
      out["label_accuracy"] = float(np.mean(preds == labels))
  return out


def evaluate(config, workdir, setup, state):
  """Writes samples/{generator,teacher}.npz, grids, and returns the eval/final.json dict."""
  from simjax.pipelines import image as image_pipeline  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  nets: DistillNetworks = setup["nets"]
  train, heldout = image_pipeline.load_data(config)
  features = make_features(config, workdir, train)
  ref = reference_stats(config, features, train)
  n, seed, batch = int(config.eval.num_samples), int(config.eval.seed), int(config.eval.batch_size)
  num_classes = int(config.eval.num_classes)

  gen_x, gen_l = distill.generate_samples(nets, state.ema["generator"], setup["extra"], n, batch, seed,
                                          nets.label_dim)
  gen_x = np.clip(gen_x, -1.0, 1.0)
  t_gen = time.time()
  teacher = setup["consts"]["teacher"]
  tea_x, tea_l = teacher_samples(nets.teacher.module, teacher, n, batch, seed + 1, nets.label_dim, config)
  tea_x = np.clip(tea_x, -1.0, 1.0)
  t_tea = time.time()
  results = {
      "generator": measure(features, ref, gen_x, _labels_to_int(gen_l), 1, num_classes),
      "teacher": measure(features, ref, tea_x, _labels_to_int(tea_l),
                         samplers.num_function_evals(int(config.eval.teacher_steps)), num_classes),
      "reference": measure(features, ref, heldout.x, heldout.labels if nets.label_dim else None, 0, num_classes),
  }
  results["generator"]["step"] = int(jax.device_get(state.step))
  results["generator"]["sample_seconds"] = t_gen - t0
  results["teacher"]["sample_seconds"] = t_tea - t_gen
  results["generator"]["fd_ratio_to_teacher"] = (results["generator"]["frechet_distance"] /
                                                 max(results["teacher"]["frechet_distance"], 1e-12))
  report.write_samples(workdir, "generator", gen_x, gen_l)
  report.write_samples(workdir, "teacher", tea_x, tea_l)
  write_side_by_side(workdir, tea_x, gen_x, results["teacher"]["nfe"])
  print("eval: " + " | ".join(f"{k}: FD={v['frechet_distance']:.3f} nfe={v['nfe']}" for k, v in results.items()),
        flush=True)
  return results


def periodic_eval_hook(config, workdir, setup):
  """Every config.eval.every steps: Frechet distance of config.eval.periodic_samples EMA-generator samples,
  appended to eval/periodic.jsonl (the cheap running FID; the full count runs at the end)."""
  from simjax.pipelines import image as image_pipeline  # pylint: disable=import-outside-toplevel
  cache = {}
  nets = setup["nets"]
  # Built once: every periodic eval reuses the compiled generator batch.
  sample = distill.make_generator_sampler(nets, setup["extra"], int(config.eval.batch_size), nets.label_dim)

  def hook(step, state):
    if not cache:
      train, _ = image_pipeline.load_data(config)
      cache["features"] = make_features(config, workdir, train)
      cache["ref"] = reference_stats(config, cache["features"], train)
    x, labels = sample(state.ema["generator"], int(config.eval.periodic_samples), int(config.eval.seed))
    row = measure(cache["features"], cache["ref"], np.clip(x, -1, 1), _labels_to_int(labels), 1,
                  int(config.eval.num_classes))
    row["step"] = int(step)
    if jax.process_index() == 0:
      path = epath.Path(workdir) / "eval" / "periodic.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
      print(f"[eval] step {step}: generator FD={row['frechet_distance']:.3f} "
            f"({row['num_samples']} samples)", flush=True)
  return hook


def write_side_by_side(workdir, teacher_x, gen_x, teacher_nfe, cols=10, rows=10):
  n = cols * rows
  scale = max(1, 96 // teacher_x.shape[1])
  left = report.image_grid(teacher_x[:n], cols, scale=scale)
  right = report.image_grid(gen_x[:n], cols, scale=scale)
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  canvas = Image.new(left.mode, (left.width + right.width + 12, left.height + 18), "white")
  canvas.paste(left, (0, 18))
  canvas.paste(right, (left.width + 12, 18))
  draw = ImageDraw.Draw(canvas)
  draw.text((2, 2), f"teacher Heun ({teacher_nfe} NFE)", fill="black")
  draw.text((left.width + 14, 2), "SIM generator (1 NFE)", fill="black")
  report.write_png(epath.Path(workdir) / "samples" / "teacher_vs_generator.png", canvas)
  report.write_png(epath.Path(workdir) / "samples" / "generator.png", right)
  report.write_png(epath.Path(workdir) / "samples" / "teacher.png", left)


# ----------------------------------------------------------------------------------------------
# --mode=sample

GENERATOR_INFO = "generator.json"


def sample_mode(config, workdir):
  """Generates config.sample.num images from a generator or teacher checkpoint into samples/."""
  source = config.sample.source
  wd = epath.Path(workdir)
  path = epath.Path(config.sample.checkpoint) if config.sample.checkpoint else None
  if source == "generator":
    path = path or wd / "generator"
    if not (path / "arch.json").exists():
      raise UserError(f"no exported generator at {path}; finish a run first or set --config.sample.checkpoint.")
    info = json.loads((path / GENERATOR_INFO).read_text())
    teacher = edm_teachers.load_teacher(path)
    params, extra = split_variables(teacher.params)
    nets = DistillNetworks(generator=Denoiser(teacher.module), fake=None, teacher=None,
                           data_shape=(teacher.img_resolution, teacher.img_resolution, teacher.img_channels),
                           label_dim=teacher.label_dim, sigma_init=float(info["sigma_init"]))
    x, labels = distill.generate_samples(nets, params, extra, int(config.sample.num), int(config.eval.batch_size),
                                         int(config.sample.seed), teacher.label_dim)
  elif source == "teacher":
    from simjax.pipelines import image as image_pipeline  # pylint: disable=import-outside-toplevel
    path = path or image_pipeline.resolve_teacher_path(config, workdir)
    teacher = edm_teachers.load_teacher(path)
    x, labels = teacher_samples(teacher.module, teacher.params, int(config.sample.num), int(config.eval.batch_size),
                                int(config.sample.seed), teacher.label_dim, config)
  else:
    raise UserError(f"unknown sample.source {source!r}; use 'generator' or 'teacher'.")
  x = np.clip(x, -1.0, 1.0)
  report.write_samples(workdir, f"sample_{source}", x, labels)
  report.write_png(wd / "samples" / f"sample_{source}.png",
                   report.image_grid(x[:100], 10, scale=max(1, 96 // x.shape[1])))
  print(f"wrote {len(x)} samples from {path} to {wd / 'samples' / f'sample_{source}.npz'}", flush=True)
  return "done"
