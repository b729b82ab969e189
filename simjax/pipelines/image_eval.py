"""Evaluation and sampling for image runs: Frechet distances, class histograms, sample files and grids.

Feature spaces: 'digit_classifier' (a small classifier trained deterministically on the training
split; the digits analogue of FID) or 'inception' (FID Inception-v3 from a user-given .pth).
Sources (eval/final.json): the one-step EMA generator, the teacher's Heun sampler, and a held-out
real sample (the metric's floor; absent with data.name='none', where the reference statistics come from
eval.fid_ref alone). A latent teacher (config.vae set: EDM2's ImageNet-512 networks) samples latents;
they are decoded with the VAE and the checkpoint's latent normalisation before features and grids, and
the .npz files keep the latents (the data's own layout).
"""
import functools
import json
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from simjax import data as data_lib
from simjax import exported, sampling, storage, tensorboard
from simjax.conditioning import CondSpace
from simjax.diffusion import samplers
from simjax.errors import UserError
from simjax.eval import fid as fid_lib
from simjax.eval import report
from simjax.parallel import mesh as mesh_lib
from simjax.pipelines import image_teacher
from simjax.teachers import guidance
from simjax.training import distill


# ----------------------------------------------------------------------------------------------
# Feature spaces: `fn(images)` on a batch split over the mesh -> (features [B, D], predicted class [B] or None)

class DigitFeatures:
  """The digit classifier's penultimate features and its predictions; trained once per workdir and cached."""

  def __init__(self, config, workdir, train_split):
    from simjax.eval import digit_classifier as dc  # pylint: disable=import-outside-toplevel
    path = epath.Path(workdir) / "eval" / "digit_classifier.msgpack"
    cfg = config.eval.classifier
    model = dc.DigitClassifier(int(cfg.features))
    template = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    if path.exists():
      params = flax.serialization.from_bytes(template, path.read_bytes())
    else:
      params = dc.train_classifier(train_split.x, train_split.labels, steps=int(cfg.steps), seed=int(cfg.seed),
                                   features=int(cfg.features))
      if jax.process_index() == 0:
        storage.atomic_write_bytes(path, flax.serialization.to_bytes(jax.device_get(params)))

    @jax.jit
    def fn(images):
      logits, feats = model.apply({"params": params}, images.astype(jnp.float32), return_features=True)
      return feats, jnp.argmax(logits, -1).astype(jnp.int32)
    self.fn = fn
    self.has_classes = True


class InceptionFeatures:
  """FID Inception-v3 pool3 features of images in [-1, 1] (mapped to [0, 1])."""

  def __init__(self, config, mesh):
    from simjax.eval import inception  # pylint: disable=import-outside-toplevel
    variables = inception.load_fid_inception(config.eval.inception_path)
    pool3 = inception.make_inception_feature_fn(variables, mesh)
    self.fn = jax.jit(lambda images: (pool3((images + 1.0) / 2.0), None))
    self.has_classes = False


class DecodedFeatures:
  """Another feature space's features of decoded latents (a latent teacher's samples)."""

  def __init__(self, features, codec):
    self.fn = jax.jit(lambda latents: features.fn(codec.decode(latents)))
    self.has_classes = features.has_classes


def make_features(config, workdir, train_split, mesh):
  kind = config.eval.features
  if kind == "digit_classifier":
    features = DigitFeatures(config, workdir, train_split)
  elif kind == "inception":
    features = InceptionFeatures(config, mesh)
  else:
    raise UserError(f"unknown eval.features {kind!r}; use 'digit_classifier' or 'inception'.")
  codec = latent_codec(config)
  return DecodedFeatures(features, codec) if codec is not None else features


@functools.lru_cache(maxsize=2)
def _load_codec(vae_path: str, teacher_path: str):
  from simjax.teachers import edm2_latents  # pylint: disable=import-outside-toplevel
  # The teacher's own read (once per process, shared with the run) carries its latent normalisation.
  norm = image_teacher.read_teacher(teacher_path).latents
  if norm is None:
    raise UserError(f"config.vae is set but the teacher {teacher_path} carries no latent normalisation (EDM2's "
                    "latent pickles do, as their StabilityVAEEncoder); unset --config.vae for a pixel-space teacher.")
  try:
    return edm2_latents.load_latent_codec(vae_path, norm)
  except (ValueError, OSError) as e:
    raise UserError(f"cannot use the VAE {vae_path} for this teacher ({' '.join(str(e).split())}).") from None


def latent_codec(config, workdir=None):
  """The LatentCodec (VAE + the teacher checkpoint's latent normalisation) of a latent run, else None."""
  if not config.vae:
    return None
  return _load_codec(str(config.vae), str(image_teacher.resolve_teacher_path(config, workdir or "")))


def viewable(config, x, batch_size=16):
  """Samples as images in [-1, 1]: decoded in batches for a latent run, else clipped."""
  codec = latent_codec(config)
  if codec is None:
    return np.clip(x, -1.0, 1.0)
  from simjax.teachers.vae_checkpoints import decode_in_batches  # pylint: disable=import-outside-toplevel
  return decode_in_batches(codec.decode, x, batch_size)


def process_share(n):
  """This process's contiguous slice of n rows that every process holds (data splits)."""
  bounds = np.linspace(0, n, jax.process_count() + 1).astype(int)
  return slice(bounds[jax.process_index()], bounds[jax.process_index() + 1])


def stream_features(features, x_local, labels_local, *, mesh, batch_size, describe=""):
  """Features of every process's rows, each device computing its slice (fid.compute_fid_stats).

  Returns ((mu, sigma), predictions or None, labels or None), the last two pooled over processes in
  matching order. batch_size is global (split over the processes, like the sampler's)."""
  per_process = max(1, batch_size // jax.process_count())
  total_batches = -(-len(x_local) // per_process)
  rows = {"x": np.asarray(x_local, np.float32)}
  if labels_local is not None:
    rows["labels"] = np.asarray(labels_local, np.int32)

  def fn(batch):
    feats, preds = features.fn(batch["x"])
    outputs = {} if preds is None else {"pred": preds}
    if "labels" in batch:  # travels with its image, so predictions and labels stay aligned
      outputs["label"] = batch["labels"]
    return feats, outputs

  def progress(done, _):
    if describe and jax.process_index() == 0 and (done == 1 or done == total_batches or done % 10 == 0):
      print(f"{describe}: features batch {done}/{total_batches}", flush=True)

  mu, sigma, outputs = fid_lib.compute_fid_stats(fn, [rows], batch_size=per_process, mesh=mesh,
                                                 num_samples=len(x_local), return_outputs=True, progress=progress)
  outputs = outputs or {}
  return (mu, sigma), outputs.get("pred"), outputs.get("label")


def reference_stats(config, features, train_split, mesh):
  if config.eval.fid_ref:
    return fid_lib.load_reference_stats(config.eval.fid_ref)
  if train_split is None:
    raise UserError("data.name='none' has no data to compute reference statistics from; set --config.eval.fid_ref "
                    "to a reference statistics file (EDM's fid-refs .npz).")
  share = process_share(len(train_split.x))
  stats, _, _ = stream_features(features, train_split.x[share], None, mesh=mesh,
                                batch_size=int(config.eval.batch_size), describe="eval: reference statistics")
  return stats


# ----------------------------------------------------------------------------------------------
# Samples

def make_teacher_sampler(module, config, mesh, cond_space: CondSpace):
  """sample(variables, num, seed) -> sampling.Samples: the teacher's Heun sampler (config.eval.teacher_steps,
  2n-1 NFE) in global batches of config.eval.batch_size split over the mesh; the step compiles once."""
  steps = int(config.eval.teacher_steps)
  weight = guidance.weight_of(config)  # classifier-free guidance of a conditional teacher (1 = none)
  batch_fn = sampling.make_heun_batch_fn(
      lambda v, x, s, cond: guidance.guided(lambda x_, s_, c_: module.apply(v, x_, s_, c_), weight)(x, s, cond),
      mesh, num_steps=steps,
      sigma_min=float(config.sigma_min), sigma_max=float(config.sigma_max), rho=float(config.rho))
  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  batch = int(config.eval.batch_size)
  noise = sampling.make_noise_fn(batch, shape, cond_space, mesh)
  describe = f"teacher Heun {samplers.num_function_evals(steps)} NFE" + (f", guidance {weight:g}" if weight != 1 else "")

  def sample(variables, num, seed, prefix="eval", cond=None):
    return sampling.sample(batch_fn, sampling.replicate(variables, mesh), num=num, batch_size=batch, seed=seed,
                           data_shape=shape, cond_space=cond_space, mesh=mesh, describe=f"{prefix}: {describe}",
                           noise_fn=noise, cond=cond)
  return sample


def teacher_samples(module, variables, num, batch, seed, config, mesh=None):
  """(x, one-hot labels or None) from the teacher's Heun sampler on every process; see make_teacher_sampler."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.eval.batch_size = int(batch)
  out = make_teacher_sampler(module, cfg, mesh or mesh_lib.make_mesh((-1, 1)),
                             CondSpace(label_dim=module.label_dim))(variables, num, seed)
  return out.x, out.labels


def load_splits(config):
  """(train, heldout) of the configured data, or (None, None) for data.name='none' (ImageNet runs: FID
  against eval.fid_ref only)."""
  if config.data.name == "none":
    return None, None
  return data_lib.load_splits(config)


def _labels_to_int(labels):
  return None if labels is None else np.argmax(labels, -1).astype(np.int32)


def measure(features, ref_stats, x_local, labels_local, nfe, num_classes, *, mesh, batch_size, num_samples,
            describe=""):
  """Frechet distance (and class histogram, label accuracy) of every process's rows x_local, labels_local."""
  (mu, sigma), preds, labels = stream_features(features, x_local, labels_local, mesh=mesh, batch_size=batch_size,
                                               describe=describe)
  out = {"nfe": nfe, "frechet_distance": float(fid_lib.frechet_distance(mu, sigma, *ref_stats)),
         "num_samples": int(num_samples)}
  if preds is not None:
    hist = np.bincount(preds, minlength=num_classes) / len(preds)
    out["class_histogram"] = hist.tolist()
    out["min_class_fraction"] = float(hist.min())
    if labels is not None:
      out["label_accuracy"] = float(np.mean(preds == labels))
  return out


def evaluate(config, workdir, distillation: distill.Distillation, state):
  """Writes samples/{generator,teacher}.npz, grids, and returns the eval/final.json dict."""
  t0 = time.time()
  nets, mesh = distillation.nets, distillation.mesh
  n, seed, batch = int(config.eval.num_samples), int(config.eval.seed), int(config.eval.batch_size)
  num_classes = int(config.eval.num_classes)
  steps = int(config.eval.teacher_steps)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  say(f"eval: {n} samples each from the generator (1 NFE) and the teacher (Heun, "
      f"{samplers.num_function_evals(steps)} NFE), in batches of {batch} over {jax.device_count()} devices",
      flush=True)

  gen = distill.make_generator_sampler(nets, distillation.generator_extra, batch, mesh)(
      state.ema["generator"], n, seed, "eval: generator 1 NFE")
  t_gen = time.time()
  tea = make_teacher_sampler(nets.teacher.module, config, mesh, nets.cond_space)(distillation.consts["teacher"], n, seed + 1)
  t_tea = time.time()

  say(f"eval: {config.eval.features} features (reference statistics, then each source)", flush=True)
  train, heldout = load_splits(config)
  features = make_features(config, workdir, train, mesh)
  ref = reference_stats(config, features, train, mesh)
  common = dict(mesh=mesh, batch_size=batch)
  clip = (lambda x: x) if config.vae else (lambda x: np.clip(x, -1.0, 1.0))  # latents are not clipped
  results = {
      "generator": measure(features, ref, clip(gen.local_x), _labels_to_int(gen.local_labels), 1,
                           num_classes, num_samples=n, describe="eval: generator", **common),
      "teacher": measure(features, ref, clip(tea.local_x), _labels_to_int(tea.local_labels),
                         samplers.num_function_evals(steps), num_classes, num_samples=n, describe="eval: teacher",
                         **common),
  }
  if heldout is not None:  # the metric's floor: real held-out images against the same statistics
    share = process_share(len(heldout.x))
    results["reference"] = measure(features, ref, heldout.x[share], heldout.labels[share] if nets.label_dim else None,
                                   0, num_classes, num_samples=len(heldout.x), describe="eval: reference", **common)
  results["generator"]["step"] = int(jax.device_get(state.step))
  results["generator"]["sample_seconds"] = t_gen - t0
  results["teacher"]["sample_seconds"] = t_tea - t_gen
  results["generator"]["fd_ratio_to_teacher"] = (results["generator"]["frechet_distance"] /
                                                 max(results["teacher"]["frechet_distance"], 1e-12))
  gen_x, tea_x = clip(gen.x), clip(tea.x)
  report.write_samples(workdir, "generator", gen_x, gen.labels)
  report.write_samples(workdir, "teacher", tea_x, tea.labels)
  write_side_by_side(workdir, viewable(config, tea_x[:100]), viewable(config, gen_x[:100]), results["teacher"]["nfe"],
                     step=results["generator"]["step"])
  tensorboard.scalars(workdir, "sim", results["generator"]["step"],
                      {f"eval/{source}_frechet_distance": row["frechet_distance"] for source, row in results.items()})
  say("eval: " + " | ".join(f"{k}: FD={v['frechet_distance']:.3f} nfe={v['nfe']}" for k, v in results.items()),
      flush=True)
  return results


def periodic_eval_hook(config, workdir, distillation: distill.Distillation):
  """Every config.eval.every steps: Frechet distance of config.eval.periodic_samples EMA-generator samples,
  appended to eval/periodic.jsonl (the cheap running FID; the full count runs at the end)."""
  cache = {}
  nets, mesh = distillation.nets, distillation.mesh
  batch = int(config.eval.batch_size)
  # Built once: every periodic eval reuses the compiled generator batch.
  sample = distill.make_generator_sampler(nets, distillation.generator_extra, batch, mesh)

  def hook(step, state):
    if not cache:
      train, _ = load_splits(config)
      cache["features"] = make_features(config, workdir, train, mesh)
      cache["ref"] = reference_stats(config, cache["features"], train, mesh)
    num = int(config.eval.periodic_samples)
    out = sample(state.ema["generator"], num, int(config.eval.seed), f"[eval] step {step}: generator")
    local_x = out.local_x if config.vae else np.clip(out.local_x, -1, 1)
    row = measure(cache["features"], cache["ref"], local_x, _labels_to_int(out.local_labels), 1,
                  int(config.eval.num_classes), mesh=mesh, batch_size=batch, num_samples=num)
    scalars, row = row, {"step": int(step), "stage": "sim", "time": round(time.time(), 3), **row}  # as metrics.jsonl's
    if jax.process_index() == 0:
      storage.append_line(epath.Path(workdir) / "eval" / "periodic.jsonl", json.dumps(row) + "\n")
      tensorboard.scalars(workdir, "sim", step, {f"eval/periodic_{k}": v for k, v in scalars.items()})
      print(f"[eval] step {step}: generator FD={row['frechet_distance']:.3f} "
            f"({row['num_samples']} samples)", flush=True)
  return hook


def write_side_by_side(workdir, teacher_x, gen_x, teacher_nfe, cols=10, rows=10, step=0):
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
  tensorboard.image(workdir, "sim", step, "samples/teacher_vs_generator", canvas)


# ----------------------------------------------------------------------------------------------
# --mode=sample

def sample_mode(config, workdir, mesh=None):
  """Generates config.sample.num images from a generator or teacher checkpoint into samples/; a class-conditional
  model samples config.sample.classes in turn (e.g. (207, 360): a golden retriever, an otter, ...) or, with
  none given, uniformly drawn classes.

  Every process computes its share of each batch; process 0 writes the gathered samples."""
  source = config.sample.source
  wd = epath.Path(workdir)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh_shape)
  path = epath.Path(config.sample.checkpoint) if config.sample.checkpoint else None
  num, seed, batch = int(config.sample.num), int(config.sample.seed), int(config.eval.batch_size)
  sampling.check_batch_size(batch, mesh)
  classes = tuple(int(c) for c in config.sample.classes)
  # Chosen classes, repeated in turn (the latents stay the seed's); none: uniformly drawn classes.
  cond = np.eye(int(config.label_dim), dtype=np.float32)[np.resize(classes, num)] if classes else None
  if source == "generator":
    path = path or wd / "generator"
    try:
      generator = exported.load_generator(path)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # a user's files: any failure to read them is bad input
      raise UserError(f"cannot read the exported generator at {path} ({type(e).__name__}); rerun the training "
                      "or point --config.sample.checkpoint at a run's generator/ folder.") from None
    x, labels = generator.sample(num, seed, cond, batch_size=batch, return_labels=True, mesh=mesh,
                                 describe="sample: generator 1 NFE")
  elif source == "teacher":
    path = path or image_teacher.resolve_teacher_path(config, workdir)
    teacher = image_teacher.read_teacher(str(path))
    out = make_teacher_sampler(teacher.module, config, mesh, CondSpace(label_dim=teacher.label_dim))(
        teacher.params, num, seed, "sample", cond=cond)
    x, labels = (out.x if config.vae else np.clip(out.x, -1.0, 1.0)), out.labels
  else:
    raise UserError(f"unknown sample.source {source!r}; use 'generator' or 'teacher'.")
  report.write_samples(workdir, f"sample_{source}", x, labels)
  images = viewable(config, x[:100])
  report.write_png(wd / "samples" / f"sample_{source}.png",
                   report.image_grid(images, 10, scale=max(1, 96 // images.shape[1])))
  if jax.process_index() == 0:
    print(f"wrote {len(x)} samples from {path} to {wd / 'samples' / f'sample_{source}.npz'}", flush=True)
  return "done"
