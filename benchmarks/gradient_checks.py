"""The finite-difference relative errors of every generator loss, as one table (issue 15's numbers).

The tests (tests/test_sim_gradient.py, tests/test_loss_family.py) assert each error below their tolerance;
this prints the errors themselves, on the same cases (an affine Gaussian generator, a Gaussian and a
mixture teacher, the exact diffused denoiser as the fake score), and each loss's wrong construction on the
same check, which must be far off:

  python benchmarks/gradient_checks.py            # a markdown table on stdout
"""
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# pylint: disable=wrong-import-position
from analytic_cases import REL_TOL  # noqa: E402
import test_loss_family as lf  # noqa: E402
import test_sim_gradient as sg  # noqa: E402
from simjax.losses import generator as generator_losses  # noqa: E402
from simjax.losses import sim  # noqa: E402

SIGMAS = (0.2, 0.7, 2.0)


def sim_error(teacher, distance, sigma, detach=False):
  g, fd = sg.gradients(teacher, distance, sigma, detach=detach)
  return sg.rel_err(g, fd)


def loss_error(name, teacher, sigma, z, eps, wrong=False):
  if name.startswith("sid"):
    alpha = float(name.split("=")[1])
    per = lf.sid_with_y_detached(alpha) if wrong else lf.registered("sid", alpha=alpha)
    return lf.rel_err(lf.surrogate_gradient(per, teacher, sigma, z, eps),
                      lf.finite_differences(lf.sid_objective(teacher, sigma, alpha, z, eps)))
  if name in lf.RATIO_CHECKS:
    return lf.rel_err(*lf.RATIO_CHECKS[name](teacher, sigma, z, eps, wrong=wrong))
  f = generator_losses.F_DIVERGENCES[name.split("=")[1]]
  fd = lf.finite_differences(lf.f_expansion_objective(f, teacher, sigma, z, eps))
  if wrong and name == "f=reverse_kl":  # its weights are constant: the control drops the density branch
    no_density = generator_losses.FDivergence(score=f.score, density=lambda u: 0.0 * u)
    return lf.rel_err(lf.f_surrogate_gradient(no_density, teacher, sigma, z, eps), fd)
  if wrong:  # the ratio under stop-gradient: the weights' dependence on theta through x_t lost
    return lf.rel_err(lf.f_surrogate_gradient(f, teacher, sigma, z, eps, stop_ratio=True), fd)
  return lf.rel_err(lf.f_surrogate_gradient(f, teacher, sigma, z, eps), fd)


WRONG = {"sim l2": "d'(y) detached", "sim pseudo_huber": "d'(y) detached", "sid alpha=1.0": "y detached",
         "sid alpha=1.2": "y detached", "diff_instruct": "no stop-gradient on b - a",
         "dmd": "normaliser differentiable"}


def main():
  cols = [(t, s) for t in ("gaussian", "mixture") for s in SIGMAS]
  rows = []
  with jax.enable_x64(True):
    z, eps = lf.draws()
    for name, distance in (("sim l2", sim.squared_l2()), ("sim pseudo_huber", sim.pseudo_huber(0.3))):
      errs = [sim_error(lf.TEACHERS[t], distance, s) for t, s in cols]
      rows.append((name, errs, sim_error(lf.MIXTURE, distance, 0.7, detach=True)))
    for name in ("sid=1.0", "sid=1.2", "diff_instruct", "dmd"):
      errs = [loss_error(name, lf.TEACHERS[t], s, z, eps) for t, s in cols]
      label = name.replace("sid=", "sid alpha=")
      rows.append((label, errs, loss_error(name, lf.MIXTURE, 0.7, z, eps, wrong=True)))
    for f in sorted(generator_losses.F_DIVERGENCES):
      # sigma 0.2 left out as in the tests: the Monte-Carlo gradient's own error there is 0.1-0.2.
      errs = [loss_error(f"f={f}", lf.TEACHERS[t], s, z, eps) if s != 0.2 else None for t, s in cols]
      WRONG[f"uni_instruct {f}"] = "no density branch" if f == "reverse_kl" else "ratio under stop-gradient"
      rows.append((f"uni_instruct {f}", errs, loss_error(f"f={f}", lf.MIXTURE, 0.7, z, eps, wrong=True)))
  head = " | ".join(f"{t} s={s:g}" for t, s in cols)
  print(f"| loss | {head} | wrong construction (mixture, s=0.7) |")
  print("|" + " --- |" * (len(cols) + 2))
  for name, errs, wrong in rows:
    cells = " | ".join("-" if e is None else f"{e:.2g}" for e in errs)
    print(f"| {name} | {cells} | {wrong:.3f} ({WRONG[name]}) |")
  print(f"\ntolerance of the tests: {REL_TOL}; a wrong construction must exceed {3 * REL_TOL:.2f}")


if __name__ == "__main__":
  main()
