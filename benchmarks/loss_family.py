"""Every registered generator loss on the same budget: quality at equal steps, quality against steps, cost.

  python benchmarks/loss_family.py --out=/tmp/loss_family                              # gmm2d + aniso16
  python benchmarks/loss_family.py --out=/tmp/lf --problems=gmm2d --steps=3000 --points=3 --lrs=1e-4,3e-4

Each (problem, loss, learning rate) is one `python -m simjax.main` run of the problem's config with
`--config.loss.name=<loss>` and both learning rates set to the value, resumed at `points` evenly spaced
step counts up to `steps` (a resumed run replays a single long one exactly), so every point is the
pipeline's own final evaluation: sliced-W2 to the true mixture, off-mode mass and the worst mode-weight
error of the generator's EMA, beside the teacher's Heun sampler and the true-sample floor. ms/iteration
is timed in this process, apart from the runs (whose logged step rates include evaluation and
checkpoints): each loss's jitted SIM iteration on the problem's config, timed in interleaved rounds
(every loss once per round, so a shared machine's drift hits all of them alike), median over rounds,
and its ratio to `sim` within the same rounds. For each loss the learning rate with the lowest final
sliced-W2 is the one reported (the sweep is stated in the table).

Writes <out>/results.jsonl (one row per point), <out>/table.md and <out>/curves.png (sliced-W2 against
steps, one panel per problem, one line per loss at its chosen learning rate).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBLEMS = {
    "gmm2d": ["--config=configs/gmm2d.py"],
    "aniso16": ["--config=configs/gmm_aniso.py:16"],
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def run_point(workdir: Path, problem: str, loss: str, lr: float, steps: int, extra):
  cmd = [sys.executable, "-m", "simjax.main", *PROBLEMS[problem], f"--workdir={workdir}",
         f"--config.loss.name={loss}", f"--config.optim.generator.lr={lr}", f"--config.optim.fake.lr={lr}",
         f"--config.num_steps={steps}", f"--config.checkpoint_every={steps}", *extra]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
  return json.loads((workdir / "eval" / "final.json").read_text())


def time_iterations(problem: str, losses, rounds: int = 7, iters: int = 20):
  """{loss: (median ms per SIM iteration, median ratio to sim's within a round)} on `problem`'s config."""
  import time  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from simjax import config_files  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import gmm  # pylint: disable=import-outside-toplevel
  from simjax.training import sim_steps, distill  # pylint: disable=import-outside-toplevel
  path, _, arg = PROBLEMS[problem][0].split("=", 1)[1].partition(":")
  steps = {}
  for loss in losses:
    config = config_files.load(REPO / path).get_config(arg or None)
    config.loss.name = loss
    config.init.copy_steps = 0  # the warm start does not change the step's cost
    dist, _ = gmm.build(config)
    state, shardings, specs = distill.setup_state(dist.optimizers, config, dist.mesh, _NoCheckpoints(),
                                                  init_fn=dist.init_fn, ema_names=("generator",))
    consts, step_specs = distill.iteration_inputs(dist, config, specs)
    it = sim_steps.make_sim_iteration(dist.nets, config, dist.mesh, step_specs, dist.optimizers)
    fn = jax.jit(it, out_shardings=(shardings, None)).lower(state, consts).compile()
    jax.block_until_ready(fn(state, consts))
    steps[loss] = (fn, state, consts)
  times = {loss: [] for loss in losses}
  for _ in range(rounds):
    for loss, (fn, state, consts) in steps.items():
      t0 = time.perf_counter()
      s = state
      for _ in range(iters):
        s, metrics = fn(s, consts)
      jax.block_until_ready((s, metrics))
      times[loss].append(1000.0 * (time.perf_counter() - t0) / iters)
  base = times.get("sim")
  return {loss: (statistics.median(t), statistics.median(a / b for a, b in zip(t, base)) if base else None)
          for loss, t in times.items()}


class _NoCheckpoints:
  def steps(self):
    return []


def curves_png(path: Path, rows, chosen, problems, losses, size=(420, 300)):
  """sliced-W2 against steps (log y), one panel per problem, one line per loss; PIL only."""
  import math  # pylint: disable=import-outside-toplevel
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  w, h = size
  img = Image.new("RGB", (w * len(problems), h + 20 * len(losses)), "white")
  draw = ImageDraw.Draw(img)
  for i, problem in enumerate(problems):
    pts = [r for r in rows if r["problem"] == problem and r["lr"] == chosen.get((problem, r["loss"]))]
    if not pts:
      continue
    xs = [r["step"] for r in pts]
    ys = [math.log10(v) for r in pts for v in (r["sliced_w2"], r["floor"])]
    x0, x1, y0, y1 = 0, max(xs), min(ys) - 0.05, max(ys) + 0.05
    to_px = lambda s, v: (i * w + 40 + (w - 60) * (s - x0) / (x1 - x0 or 1),
                          h - 30 - (h - 60) * (math.log10(v) - y0) / (y1 - y0))
    draw.rectangle([i * w + 40, 30, i * w + w - 20, h - 30], outline="black")
    draw.text((i * w + 45, 8), f"{problem}: sliced-W2 (log) vs steps; grey = true-sample floor", fill="black")
    for v, (px, py) in ((10 ** y1, to_px(0, 10 ** y1)), (10 ** y0, to_px(0, 10 ** y0))):
      draw.text((px - 38, py - 6), f"{v:.3f}", fill="black")
    draw.text((to_px(x1, 10 ** y0)[0] - 30, h - 26), f"{x1} steps", fill="black")
    floor = statistics.median(r["floor"] for r in pts)
    draw.line([to_px(0, floor), to_px(x1, floor)], fill=(160, 160, 160), width=1)
    for j, loss in enumerate(losses):
      line = sorted((r["step"], r["sliced_w2"]) for r in pts if r["loss"] == loss)
      if len(line) > 1:
        draw.line([to_px(s, v) for s, v in line], fill=COLORS[j % len(COLORS)], width=2)
  for j, loss in enumerate(losses):
    draw.text((10, h + 20 * j), f"-- {loss}", fill=COLORS[j % len(COLORS)])
  img.save(path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--problems", default="gmm2d,aniso16")
  parser.add_argument("--losses", default="", help="comma-separated; default: every registered loss")
  parser.add_argument("--lrs", default="1e-4,3e-4", help="learning rates swept per loss (generator = fake)")
  parser.add_argument("--steps", type=int, default=6000)
  parser.add_argument("--points", type=int, default=4, help="evaluations along the run")
  parser.add_argument("--extra", default="", help="more main flags for every run, space-separated")
  args = parser.parse_args(argv)
  from simjax.losses import generator as generator_losses  # pylint: disable=import-outside-toplevel
  losses = args.losses.split(",") if args.losses else list(generator_losses.LOSSES)
  problems, lrs = args.problems.split(","), [float(v) for v in args.lrs.split(",")]
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for problem in problems:
    for loss in losses:
      for lr in lrs:
        wd = out / "runs" / f"{problem}_{loss}_{lr:g}"
        for k in range(1, args.points + 1):
          step = round(args.steps * k / args.points)
          final = run_point(wd, problem, loss, lr, step, args.extra.split())
          gen = final["generator"]
          row = {"problem": problem, "loss": loss, "lr": lr, "step": step, "sliced_w2": gen["sliced_w2"],
                 "off_mode_mass": gen["off_mode_mass"], "mode_error": gen["mode_mass_max_abs_error"],
                 "teacher_sliced_w2": final["teacher"]["sliced_w2"], "floor": final["reference"]["sliced_w2"],
                 "teacher_off_mode_mass": final["teacher"]["off_mode_mass"]}
          rows.append(row)
          print(json.dumps(row), flush=True)
  for problem in problems:
    for loss, (ms, ratio) in time_iterations(problem, losses).items():
      for r in rows:
        if r["problem"] == problem and r["loss"] == loss:
          r["ms_per_iteration"], r["vs_sim"] = ms, ratio
  (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  chosen, lines = {}, ["| problem | loss | lr (swept " + ", ".join(f"{v:g}" for v in lrs) + ") | sliced-W2 | "
                       "teacher / floor | off-mode mass (teacher) | mode error | ms/iter (x sim) |",
                       "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for problem in problems:
    finals = [r for r in rows if r["problem"] == problem and r["step"] == args.steps]
    for loss in losses:
      best = min((r for r in finals if r["loss"] == loss), key=lambda r: r["sliced_w2"])
      chosen[(problem, loss)] = best["lr"]
      ms = best["ms_per_iteration"]
      ratio = f" ({best['vs_sim']:.2f}x)" if best["vs_sim"] is not None else ""
      lines.append(f"| {problem} | {loss} | {best['lr']:g} | {best['sliced_w2']:.4f} | {best['teacher_sliced_w2']:.4f}"
                   f" / {best['floor']:.4f} | {best['off_mode_mass']:.4f} ({best['teacher_off_mode_mass']:.4f}) | "
                   f"{best['mode_error']:.3f} | {ms:.2f}{ratio} |")
  table = "\n".join(lines) + f"\n\n{args.steps} steps; command: python benchmarks/loss_family.py " + " ".join(
      sys.argv[1:] if argv is None else argv) + "\n"
  (out / "table.md").write_text(table)
  curves_png(out / "curves.png", rows, chosen, problems, losses)
  print(table)


if __name__ == "__main__":
  main()
