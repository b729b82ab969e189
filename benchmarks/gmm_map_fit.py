"""How fast the gmm generator's MLP learns a grid's transport map when the map is given (a capacity bound).

Regresses MLPDenoiser(2.5 z, sigma 2.5), the generator of configs/gmm2d.py (same architecture, input and
Adam with b1 = 0), onto the exact transport map from N(0, I) to a 5x5 grid of Gaussians (the mixture of
configs/gmm_grid25.py, standardised as the gmm pipeline does): per coordinate, the quantile map of the 1-D
mixture. Prints the off-mode mass of the fitted map (eval/final.json's measure). SIM, which is not given
the map, cannot be expected to do better in the same steps.

  python benchmarks/gmm_map_fit.py --lr=1e-4 --steps=6000
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy.stats import norm  # noqa: E402

from simjax.networks.mlp import MLPDenoiser  # noqa: E402
from simjax.teachers import mixture  # noqa: E402

SIGMA_INIT = 2.5


def grid_marginal(sigma_data=0.5):
  """The 1-D marginal of the 5x5 grid (means -2..2, std 0.1) in model units: (centres, std)."""
  scale = float(np.sqrt(np.mean(np.arange(-2, 3) ** 2) + 0.1**2) / sigma_data)
  return np.arange(-2, 3) / scale, 0.1 / scale


def quantile_map(centres, std):
  grid = np.linspace(centres[0] - 10 * std, centres[-1] + 10 * std, 40001)
  cdf = norm.cdf((grid[:, None] - centres[None]) / std).mean(1)
  return lambda z: np.interp(norm.cdf(z), cdf, grid).astype(np.float32)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--steps", type=int, default=6000)
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--num_blocks", type=int, default=3)
  ap.add_argument("--batch", type=int, default=256)
  args = ap.parse_args()
  for name, low in (("steps", 1), ("hidden", 1), ("num_blocks", 0), ("batch", 1)):
    if getattr(args, name) < low:
      print(f"gmm_map_fit: error: --{name} must be >= {low}, got {getattr(args, name)}.", file=sys.stderr)
      sys.exit(2)
  if not 0 < args.lr < float("inf"):
    print(f"gmm_map_fit: error: --lr must be a finite value > 0, got {args.lr}.", file=sys.stderr)
    sys.exit(2)
  centres, std = grid_marginal()
  transport = quantile_map(centres, std)
  mlp = MLPDenoiser(data_dim=2, hidden=args.hidden, num_blocks=args.num_blocks, emb_features=128, sigma_data=0.5)
  params = mlp.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  opt = optax.adam(args.lr, b1=0.0, b2=0.999)
  bank_z = np.random.default_rng(0).standard_normal((2**18, 2)).astype(np.float32)
  bank_z, bank_x = jnp.asarray(bank_z), jnp.asarray(transport(bank_z))
  generate = lambda p, z: mlp.apply({"params": p}, SIGMA_INIT * z, jnp.full((z.shape[0],), SIGMA_INIT))

  def step(carry, i):
    p, o = carry
    idx = jax.random.randint(jax.random.key(i), (args.batch,), 0, bank_z.shape[0])
    loss, g = jax.value_and_grad(lambda q: jnp.mean(jnp.sum((generate(q, bank_z[idx]) - bank_x[idx]) ** 2, -1)))(p)
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), jnp.arange(args.steps)))(params)
  means = np.array([(a, b) for a in centres for b in centres], np.float32)
  mix = mixture.Mixture(jnp.asarray(means), jnp.full((25, 2), std, jnp.float32), jnp.full((25,), 0.04))
  z = np.random.default_rng(1).standard_normal((10000, 2)).astype(np.float32)
  mass, off = mixture.mode_statistics(mix, np.asarray(generate(params, jnp.asarray(z))))
  print(json.dumps({"lr": args.lr, "steps": args.steps, "hidden": args.hidden, "num_blocks": args.num_blocks,
                    "final_mse": float(losses[-1]), "off_mode_mass": off,
                    "mode_mass_max_abs_error": float(np.abs(mass - 0.04).max()),
                    "exact_map_off_mode_mass": mixture.mode_statistics(mix, transport(z))[1]}))


if __name__ == "__main__":
  main()
