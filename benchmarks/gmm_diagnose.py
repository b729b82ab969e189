"""Diagnoses a finished gmm run: the raw generator against its EMA, and whether the fake score keeps up.

For the workdir's last checkpoint, prints (model units):
- off-mode mass and largest mode-mass error of the EMA generator (what eval/final.json scores) and of the
  raw one (the EMA's averaging of parameters blurs a map whose steps move);
- per noise level, on the generator's samples x_t = x0 + sigma eps: |D_teacher - D_q| (the SIM signal, with
  D_q the exact denoiser of 40,000 generator samples), |D_teacher - D_fake| (what training uses) and
  |D_fake - D_q| (the fake score's error). RMS over 2,000 samples.

  python benchmarks/gmm_diagnose.py /tmp/grid25
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from simjax import workdir as workdir_lib  # noqa: E402
from simjax.pipelines import gmm  # noqa: E402
from simjax.teachers import mixture  # noqa: E402
from simjax.training import checkpoint as ckpt_lib  # noqa: E402
from simjax.training import distill  # noqa: E402


def fail(message):
  print(f"gmm_diagnose: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(workdir):
  record = Path(workdir) / "config.json"
  if not record.is_file():
    fail(f"{record} does not exist; pass the workdir of a finished gmm run (python -m simjax.main "
         "--config=configs/gmm_grid25.py --workdir=DIR).")
  config = config_dict.ConfigDict(workdir_lib.with_added_keys(json.loads(record.read_text())))
  if config.get("pipeline") != "gmm":
    fail(f"{workdir} holds a {config.get('pipeline')!r} run; pass the workdir of a gmm run.")
  if not (Path(workdir) / "checkpoints").is_dir():  # checked first: the Checkpointer would create it
    fail(f"{workdir} has no checkpoint yet; run its training first.")
  distillation, problem = gmm.build(config)
  checkpointer = ckpt_lib.Checkpointer(epath.Path(workdir).resolve() / "checkpoints", 1, 100)
  try:
    if not checkpointer.steps():  # restore_or_init would diagnose a fresh, untrained state instead
      fail(f"{workdir} has no checkpoint yet; run its training first.")
    state, _, _ = distill.restore_or_init(distillation, config, checkpointer)
  finally:
    checkpointer.close()
  nets, mix = distillation.nets, problem.model_mix
  sample = lambda p, n, seed: jnp.asarray(distill.generate_samples(nets, p, {}, n, min(n, 2000), seed)[0])  # eval batch
  report = {"step": int(jax.device_get(state.step))}
  for name, p in (("ema", state.ema["generator"]), ("raw", state.params["generator"])):
    mass, off = mixture.mode_statistics(mix, np.asarray(sample(p, 10000, 1234)))
    report[name] = {"off_mode_mass": off, "mode_mass_max_abs_error": float(np.abs(mass - np.asarray(mix.weights)).max())}
  bank, x0 = sample(state.params["generator"], 40000, 99), sample(state.params["generator"], 2000, 7)

  @jax.jit
  def exact_denoise(xt, sigma):  # the posterior mean under the empirical distribution of `bank`
    d2 = jnp.sum((xt[:, None] - bank[None]) ** 2, -1)
    return jax.nn.softmax(-d2 / (2 * sigma**2), axis=1) @ bank

  rms = lambda v: float(jnp.sqrt(jnp.mean(jnp.sum(v**2, -1))))
  report["fake_score"] = []
  for sigma in (0.03, 0.1, 0.3, 1.0, 3.0):
    xt = x0 + sigma * jax.random.normal(jax.random.key(3), x0.shape)
    s = jnp.full((xt.shape[0],), sigma)
    d_teacher, d_fake, d_q = mixture.denoise(mix, xt, s), nets.fake.apply(state.params["fake"], {}, xt, s), exact_denoise(xt, sigma)
    report["fake_score"].append({"sigma": sigma, "signal": rms(d_teacher - d_q), "used": rms(d_teacher - d_fake),
                                 "fake_error": rms(d_fake - d_q)})
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  if len(sys.argv) != 2:
    fail("usage: python benchmarks/gmm_diagnose.py WORKDIR (a finished gmm run).")
  main(sys.argv[1])
