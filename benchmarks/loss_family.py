"""Every generator loss of the family on the same budget: quality at equal steps, quality against steps, cost.

  python benchmarks/loss_family.py --out=/tmp/loss_family                              # gmm2d, aniso16, digits
  python benchmarks/loss_family.py --out=/tmp/lf --problems=gmm2d --steps=3000 --points=3 --lrs=1e-4,3e-4
  python benchmarks/loss_family.py --out=/tmp/lf --problems=gmm2d,aniso16,digits --time_only  # ms/iteration only

A variant is a loss with its settings, written `name[+key=value...]` (config keys under --config.): the
default list is every registered loss, Uni-Instruct with each f-divergence and SiDA (sid at alpha 1 with the
adversarial term). Each (problem, variant, learning rate) is one `python -m simjax.main` run of the problem's
config, resumed at `points` evenly spaced step counts up to `steps` (a resumed run replays a single long one
exactly), so every point is the pipeline's own final evaluation. On the mixtures: sliced-W2 to the true
mixture, off-mode mass and the worst mode-weight error of the generator's EMA, beside the teacher's Heun
sampler and the true-sample floor; learning rates `--lrs` (generator = fake). On the digits: the
digit-classifier Frechet distance, beside the teacher's and the held-out digits' (the floor), and the class
histogram's total-variation distance to the held-out digits' and its smallest class (collapse onto a few
digits cannot pass them); one teacher trained once in <out>/digits_teacher and loaded by every run;
learning rates `--digits_lrs` as generator/fake pairs (default: the config's own).

ms/iteration is timed in this process, apart from the runs (whose logged step rates include evaluation and
checkpoints): each variant's jitted SIM iteration on the problem's config, timed in interleaved rounds
(every variant once per round, so a shared machine's drift hits all of them alike), median over rounds, and
its ratio to `sim` within the same rounds. For each variant the learning rate with the best final quality is
the one reported (the sweep is stated in the table).

Writes <out>/results.jsonl (one row per point), <out>/table.md and <out>/curves.png (quality against steps,
one panel per problem, one line per variant at its chosen learning rate).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The mixtures at batch 256, the gmm configs' default when README's comparison was measured (now 1024).
PROBLEMS = {
    "gmm2d": ["--config=configs/gmm2d.py", "--config.batch_size=256"],
    "aniso16": ["--config=configs/gmm_aniso.py:16", "--config.batch_size=256"],
    "digits": ["--config=configs/digits.py", "--config.eval.every=0", "--config.grid_every=100000"],
}
EXTRA_VARIANTS = ["uni_instruct+loss.f=reverse_kl", "uni_instruct+loss.f=forward_kl",
                  "uni_instruct+loss.f=jensen_shannon", "sid+loss.alpha=1+adversarial.weight=1e-4"]
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def variant_settings(variant: str):
  """'sid+loss.alpha=1' -> {'loss.name': 'sid', 'loss.alpha': '1'}."""
  name, *pairs = variant.split("+")
  settings = {"loss.name": name}
  for pair in pairs:
    key, _, value = pair.partition("=")
    settings[key] = value
  return settings


def flag_settings(flags):
  """['--config.a.b=1', ...] -> {'a.b': '1', ...}, for set_config."""
  return dict(flag[len("--config."):].partition("=")[::2] for flag in flags)


def set_config(config, settings):
  """config with each dotted key set to its string value, converted to the existing value's type."""
  for key, value in settings.items():
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    old = node[leaf]
    if isinstance(old, bool):
      node[leaf] = {"true": True, "false": False}[value.lower()]
    elif isinstance(old, (int, float)):
      node[leaf] = type(old)(float(value) if isinstance(old, float) else value)
    else:
      node[leaf] = value
  return config


def teacher_flags(problem: str, out: Path):
  """The digits runs load one teacher, trained once here with the config's own settings."""
  if problem != "digits":
    return []
  teacher = out / "digits_teacher"
  final = teacher / "teacher" / "final"
  if not (final / "arch.json").exists():
    cmd = [sys.executable, "-m", "simjax.main", *PROBLEMS[problem], f"--workdir={teacher}", "--mode=train_teacher"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
      raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
  return ["--config.teacher.kind=checkpoint", f"--config.teacher.checkpoint={final}"]


def parse_lr(spec: str):
  """'1e-4' -> (1e-4, 1e-4); '5e-5/2e-4' -> (generator, fake)."""
  gen, _, fake = spec.partition("/")
  return float(gen), float(fake or gen)


def run_point(workdir: Path, problem: str, variant: str, lr, steps: int, extra):
  cmd = [sys.executable, "-m", "simjax.main", *PROBLEMS[problem], f"--workdir={workdir}",
         *(f"--config.{k}={v}" for k, v in variant_settings(variant).items()),
         f"--config.optim.generator.lr={lr[0]}", f"--config.optim.fake.lr={lr[1]}",
         f"--config.num_steps={steps}", f"--config.checkpoint_every={steps}", *extra]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
  return json.loads((workdir / "eval" / "final.json").read_text())


def quality_row(problem: str, final):
  """The point's numbers: the quality the variant is chosen by is `quality` (lower is better)."""
  gen, teacher, ref = final["generator"], final["teacher"], final["reference"]
  if problem == "digits":
    tv = lambda h: 0.5 * sum(abs(a - b) for a, b in zip(h, ref["class_histogram"]))
    return {"quality": gen["frechet_distance"], "teacher_quality": teacher["frechet_distance"],
            "floor": ref["frechet_distance"], "class_tv": tv(gen["class_histogram"]),
            "teacher_class_tv": tv(teacher["class_histogram"]), "min_class_fraction": gen["min_class_fraction"]}
  return {"quality": gen["sliced_w2"], "teacher_quality": teacher["sliced_w2"], "floor": ref["sliced_w2"],
          "off_mode_mass": gen["off_mode_mass"], "mode_error": gen["mode_mass_max_abs_error"],
          "teacher_off_mode_mass": teacher["off_mode_mass"]}


def build_distillation(problem: str, config, extra):
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import gmm, image  # pylint: disable=import-outside-toplevel
  if problem != "digits":
    return gmm.build(config)[0]
  set_config(config, flag_settings(extra))  # the shared teacher
  return image.build_distillation(config, None, mesh_lib.make_mesh(config.mesh_shape))


def time_iterations(problem: str, variants, extra=(), rounds: int = 7, iters: int = 20):
  """{variant: (median ms per SIM iteration, median ratio to sim's within a round)} on `problem`'s config."""
  import time  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from simjax import config_files  # pylint: disable=import-outside-toplevel
  from simjax.training import sim_steps, distill  # pylint: disable=import-outside-toplevel
  path, _, arg = PROBLEMS[problem][0].split("=", 1)[1].partition(":")
  steps = {}
  for variant in dict.fromkeys(["sim", *variants]):
    config = set_config(config_files.load(REPO / path).get_config(arg or None), variant_settings(variant))
    set_config(config, flag_settings(PROBLEMS[problem][1:]))
    if "init" in config:
      config.init.copy_steps = 0  # the warm start does not change the step's cost
    dist = build_distillation(problem, config, extra)
    state, shardings, specs = distill.setup_state(dist.optimizers, config, dist.mesh, _NoCheckpoints(),
                                                  init_fn=dist.init_fn, ema_names=("generator",))
    consts, step_specs = distill.iteration_inputs(dist, config, specs)
    it = sim_steps.make_sim_iteration(dist.nets, config, dist.mesh, step_specs, dist.optimizers)
    fn = jax.jit(it, out_shardings=(shardings, None)).lower(state, consts).compile()
    jax.block_until_ready(fn(state, consts))
    steps[variant] = (fn, state, consts)
  times = {variant: [] for variant in steps}
  for _ in range(rounds):
    for variant, (fn, state, consts) in steps.items():
      t0 = time.perf_counter()
      s = state
      for _ in range(iters):
        s, metrics = fn(s, consts)
      jax.block_until_ready((s, metrics))
      times[variant].append(1000.0 * (time.perf_counter() - t0) / iters)
  base = times["sim"]
  return {variant: (statistics.median(t), statistics.median(a / b for a, b in zip(t, base)))
          for variant, t in times.items()}


class _NoCheckpoints:
  def steps(self):
    return []


def curves_png(path: Path, rows, chosen, problems, variants, size=(420, 300)):
  """Quality against steps (log y), one panel per problem, one line per variant; PIL only."""
  import math  # pylint: disable=import-outside-toplevel
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  w, h = size
  img = Image.new("RGB", (w * len(problems), h + 20 * len(variants)), "white")
  draw = ImageDraw.Draw(img)
  for i, problem in enumerate(problems):
    pts = [r for r in rows if r["problem"] == problem and r["lr"] == chosen.get((problem, r["variant"]))]
    if not pts:
      continue
    xs = [r["step"] for r in pts]
    ys = [math.log10(v) for r in pts for v in (r["quality"], r["floor"])]
    x0, x1, y0, y1 = 0, max(xs), min(ys) - 0.05, max(ys) + 0.05
    to_px = lambda s, v: (i * w + 40 + (w - 60) * (s - x0) / (x1 - x0 or 1),
                          h - 30 - (h - 60) * (math.log10(v) - y0) / (y1 - y0))
    draw.rectangle([i * w + 40, 30, i * w + w - 20, h - 30], outline="black")
    metric = "Frechet distance" if problem == "digits" else "sliced-W2"
    draw.text((i * w + 45, 8), f"{problem}: {metric} (log) vs steps; grey = floor", fill="black")
    for v, (px, py) in ((10 ** y1, to_px(0, 10 ** y1)), (10 ** y0, to_px(0, 10 ** y0))):
      draw.text((px - 38, py - 6), f"{v:.3g}", fill="black")
    draw.text((to_px(x1, 10 ** y0)[0] - 30, h - 26), f"{x1} steps", fill="black")
    floor = statistics.median(r["floor"] for r in pts)
    draw.line([to_px(0, floor), to_px(x1, floor)], fill=(160, 160, 160), width=1)
    for j, variant in enumerate(variants):
      line = sorted((r["step"], r["quality"]) for r in pts if r["variant"] == variant)
      if len(line) > 1:
        draw.line([to_px(s, v) for s, v in line], fill=COLORS[j % len(COLORS)], width=2)
  for j, variant in enumerate(variants):
    draw.text((10, h + 20 * j), f"-- {variant}", fill=COLORS[j % len(COLORS)])
  img.save(path)


def table_lines(problem, finals, variants, lr_note):
  """Markdown rows of one problem: each variant at its best learning rate."""
  digits = problem == "digits"
  head = (f"| problem | variant | lr ({lr_note}) | FD | teacher / held-out FD | class TV (teacher) | smallest class "
          "| ms/iter (x sim) |" if digits else
          f"| problem | variant | lr ({lr_note}) | sliced-W2 | teacher / floor | off-mode mass (teacher) | "
          "mode error | ms/iter (x sim) |")
  lines, chosen = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"], {}
  for variant in variants:
    best = min((r for r in finals if r["variant"] == variant), key=lambda r: r["quality"])
    chosen[variant] = best["lr"]
    lr = "/".join(f"{v:g}" for v in dict.fromkeys(best["lr"]))
    cost = f"{best['ms_per_iteration']:.2f} ({best['vs_sim']:.2f}x)"
    if digits:
      lines.append(f"| {problem} | {variant} | {lr} | {best['quality']:.2f} | {best['teacher_quality']:.2f} / "
                   f"{best['floor']:.2f} | {best['class_tv']:.3f} ({best['teacher_class_tv']:.3f}) | "
                   f"{best['min_class_fraction']:.3f} | {cost} |")
    else:
      lines.append(f"| {problem} | {variant} | {lr} | {best['quality']:.4f} | {best['teacher_quality']:.4f} / "
                   f"{best['floor']:.4f} | {best['off_mode_mass']:.4f} ({best['teacher_off_mode_mass']:.4f}) | "
                   f"{best['mode_error']:.3f} | {cost} |")
  return lines, chosen


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--problems", default="gmm2d,aniso16,digits")
  parser.add_argument("--variants", default="", help="comma-separated; default: every registered loss and "
                      + ", ".join(EXTRA_VARIANTS))
  parser.add_argument("--lrs", default="1e-4,3e-4", help="learning rates swept on the mixtures (generator = fake)")
  parser.add_argument("--digits_lrs", default="5e-5/2e-4", help="generator/fake pairs swept on the digits")
  parser.add_argument("--steps", type=int, default=6000)
  parser.add_argument("--digits_steps", type=int, default=0, help="steps on the digits (0: --steps)")
  parser.add_argument("--points", type=int, default=4, help="evaluations along the run")
  parser.add_argument("--extra", default="", help="more main flags for every run, space-separated")
  parser.add_argument("--time_only", action="store_true", help="only the ms/iteration timing, to <out>/timing.json")
  args = parser.parse_args(argv)
  from simjax.losses import generator as generator_losses  # pylint: disable=import-outside-toplevel
  # uni_instruct is listed with each of its f-divergences
  variants = args.variants.split(",") if args.variants else [
      name for name in generator_losses.LOSSES if name != "uni_instruct"] + EXTRA_VARIANTS
  problems = args.problems.split(",")
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  if args.time_only:  # one process, nothing else running: the cleanest ratios
    timing = {problem: time_iterations(problem, variants, teacher_flags(problem, out) + args.extra.split())
              for problem in problems}
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(json.dumps(timing, indent=1))
    return
  rows, lines, chosen = [], [], {}
  for problem in problems:
    lrs = [parse_lr(v) for v in (args.digits_lrs if problem == "digits" else args.lrs).split(",")]
    steps = args.digits_steps if problem == "digits" and args.digits_steps else args.steps
    extra = teacher_flags(problem, out) + args.extra.split()
    for variant in variants:
      for lr in lrs:
        wd = out / "runs" / f"{problem}_{variant}_{lr[0]:g}_{lr[1]:g}"
        for k in range(1, args.points + 1):
          step = round(steps * k / args.points)
          row = {"problem": problem, "variant": variant, "lr": lr, "step": step,
                 **quality_row(problem, run_point(wd, problem, variant, lr, step, extra))}
          rows.append(row)
          print(json.dumps(row), flush=True)
    for variant, (ms, ratio) in time_iterations(problem, variants, extra).items():
      for r in rows:
        if r["problem"] == problem and r["variant"] == variant:
          r["ms_per_iteration"], r["vs_sim"] = ms, ratio
    finals = [r for r in rows if r["problem"] == problem and r["step"] == steps]
    lr_note = "swept " + ", ".join("/".join(f"{v:g}" for v in dict.fromkeys(lr)) for lr in lrs)
    problem_lines, problem_chosen = table_lines(problem, finals, variants, lr_note)
    lines += problem_lines + [f"\n{steps} steps\n"]
    chosen.update({(problem, v): lr for v, lr in problem_chosen.items()})
  (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  table = "\n".join(lines) + "\ncommand: python benchmarks/loss_family.py " + " ".join(
      sys.argv[1:] if argv is None else argv) + "\n"
  (out / "table.md").write_text(table)
  curves_png(out / "curves.png", rows, chosen, problems, variants)
  print(table)


if __name__ == "__main__":
  main()
