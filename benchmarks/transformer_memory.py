"""Memory and speed of PixArt-XL-2 at 512 (64x64 latents, 1024 tokens, a 120-token T5 caption) as a
simjax denoiser, with random weights.

    python benchmarks/transformer_memory.py [--depth 28] [--batches 1,2,4,8] [--dtypes float32,bfloat16]
        [--time_depth 2] [--time_batch 1] [--iters 2]

Two parts, one JSON line per case:
- `memory`: at --depth (28 = the real model) for each batch, dtype and remat setting, XLA's memory
  analysis of the compiled forward (the teacher's D) and forward+backward (the gradient of a
  denoising loss w.r.t. all parameters: what the generator and fake-score steps do per network).
  Compiled ahead of time from shapes only (nothing is allocated), blocks under nn.scan. peak ~
  arguments + outputs + temporaries - aliased; `activations_mib` = temporaries (what grows with the
  batch). On the CPU these are XLA:CPU's buffer assignments: a GPU's differ by its fusions and
  workspaces, so the accelerator run is the one to size a job by.
- `time`: at --time_depth (a reduced depth, so that it runs on a CPU), seconds per image of the
  forward and forward+backward, median over --iters after a warm-up; per block it scales to 28.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from simjax.networks.dit import DiffusionTransformer
from simjax.teachers import transformer_checkpoints as tc

CAPTION_TOKENS = 120  # PixArt's T5 caption length


def _pixart_xl_512(depth, dtype, remat):
  arch = tc.arch_from_diffusers_config({"_class_name": "PixArtTransformer2DModel", "sample_size": 64,
                                        "caption_channels": 4096, "num_layers": depth})
  return DiffusionTransformer(**arch, dtype=dtype, remat=remat, scan_blocks=True)


def _inputs(net, batch):
  x = jax.ShapeDtypeStruct((batch, net.sample_size, net.sample_size, net.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  cond = {"emb": jax.ShapeDtypeStruct((batch, CAPTION_TOKENS, net.caption_channels), jnp.float32),
          "mask": jax.ShapeDtypeStruct((batch, CAPTION_TOKENS), jnp.float32)}
  return x, t, cond


def _functions(net):
  def forward(params, x, t, cond):
    return net.apply({"params": params}, x, t, cond)

  def loss(params, x, t, cond):
    return jnp.mean(jnp.square(forward(params, x, t, cond)[..., :4] - x))

  return jax.jit(forward), jax.jit(jax.grad(loss))


def _memory(compiled):
  analysis = compiled.memory_analysis()
  sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0) for name in ("argument", "output", "temp",
                                                                                     "alias")}
  peak = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
  return {"arguments_mib": round(sizes["argument"] / 2**20), "activations_mib": round(sizes["temp"] / 2**20),
          "peak_mib": round(peak / 2**20)}


def _param_shapes(net):
  return tc.param_shapes(net)["params"]


def memory_cases(depth, batches, dtypes):
  for dtype in dtypes:
    for remat in (False, True):
      net = _pixart_xl_512(depth, jnp.dtype(dtype), remat)
      params = _param_shapes(net)
      forward, grad = _functions(net)
      for batch in batches:
        args = (params,) + _inputs(net, batch)
        row = dict(part="memory", depth=depth, batch=batch, dtype=dtype, remat=remat,
                   params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))))
        start = time.perf_counter()
        row["forward"] = _memory(forward.lower(*args).compile())
        row["forward_backward"] = _memory(grad.lower(*args).compile())
        row["compile_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)


def _random(tree, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), tree)


def time_cases(depth, batch, dtypes, iters):
  for dtype in dtypes:
    net = _pixart_xl_512(depth, jnp.dtype(dtype), remat=False)
    params = _random(_param_shapes(net))
    x, t, cond = (_random(s, seed=i + 1) for i, s in enumerate(_inputs(net, batch)))
    t = jnp.full(t.shape, 500.0)
    cond = {"emb": cond["emb"], "mask": jnp.ones(cond["mask"].shape)}
    forward, grad = _functions(net)
    row = dict(part="time", depth=depth, batch=batch, dtype=dtype, device=jax.devices()[0].device_kind)
    for name, fn in (("forward", forward), ("forward_backward", grad)):
      jax.block_until_ready(fn(params, x, t, cond))  # compile + warm-up
      seconds = []
      for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, x, t, cond))
        seconds.append(time.perf_counter() - start)
      row[f"{name}_s_per_image"] = round(statistics.median(seconds) / batch, 3)
      row[f"{name}_s_per_image_per_block"] = round(statistics.median(seconds) / batch / depth, 4)
    print(json.dumps(row), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--depth", type=int, default=28)
  parser.add_argument("--batches", default="1,2,4,8")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--time_depth", type=int, default=2, help="0 skips the timing")
  parser.add_argument("--time_batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=2)
  args = parser.parse_args()
  dtypes = args.dtypes.split(",")
  if set(dtypes) - {"float32", "bfloat16"}:
    parser.error(f"--dtypes={args.dtypes}: use float32 and/or bfloat16, comma-separated.")
  try:
    batches = [int(b) for b in args.batches.split(",")]
  except ValueError:
    batches = []
  if not batches or min(batches) < 1 or min(args.depth, args.time_batch, args.iters) < 1 or args.time_depth < 0:
    parser.error("--batches must be positive integers, comma-separated; --depth, --time_batch and --iters >= 1, "
                 "--time_depth >= 0.")
  memory_cases(args.depth, batches, dtypes)
  if args.time_depth:
    time_cases(args.time_depth, args.time_batch, dtypes, args.iters)


if __name__ == "__main__":
  main()
