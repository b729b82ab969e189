"""The text-to-image default distilled at several teacher guidance weights, from one trained teacher.

    python -m simjax.main --config=configs/digits_t2i.py --workdir=workdirs/digits_t2i
    python benchmarks/t2i_guidance.py --workdir=workdirs/digits_t2i --weights=1,2,4

For each weight w, a SIM run in WORKDIR_guidance/w<w> distils the finished run's teacher (teacher/final,
its T5 in teacher/text_encoder, the training captions, the run's embedding cache) guided at w, with the
default's other settings, and is evaluated as the default is (held-out phrasings: FD in the digit
classifier's features, caption and attribute accuracy, for the generator and the teacher at that w).
One JSON line per weight; each run resumes if interrupted.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fail(message):
  print(f"t2i_guidance: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a finished configs/digits_t2i.py run")
  parser.add_argument("--weights", default="1,2,4", help="comma-separated guidance weights")
  parser.add_argument("--num_steps", type=int, default=0, help="SIM steps (0: the config's)")
  args, extra = parser.parse_known_args(argv)
  workdir = Path(args.workdir).resolve()
  for need in ("teacher/final/arch.json", "teacher/text_encoder/config.json", "embeddings/cache.json"):
    if not (workdir / need).exists():
      fail(f"{workdir / need} is missing; run configs/digits_t2i.py to the end in --workdir first.")
  try:
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
  except ValueError:
    fail(f"--weights={args.weights!r}; give comma-separated numbers, e.g. 1,2,4.")
  if not weights or any(w < 0 for w in weights):
    fail(f"--weights={args.weights!r}; give weights >= 0.")
  if args.num_steps < 0:
    fail(f"--num_steps={args.num_steps}; give 0 (the config's) or a positive count.")
  if any(not e.startswith("--config.") for e in extra):
    fail(f"unknown arguments {extra}; pass settings as --config.KEY=VALUE.")

  sys.path.insert(0, str(REPO))
  from simjax.text import embedding_cache  # pylint: disable=import-outside-toplevel
  out_root = workdir.parent / f"{workdir.name}_guidance"
  out_root.mkdir(exist_ok=True)
  prompt_file = out_root / "train_prompts.txt"
  if not prompt_file.exists():
    manifest = embedding_cache.read_manifest(str(workdir / "embeddings"))
    _, prompts = embedding_cache.load_cache(str(workdir / "embeddings"), shards=range(manifest["num_shards"]))
    prompt_file.write_text("".join(p + "\n" for p in prompts))
  for w in weights:
    run_dir = out_root / f"w{w:g}"
    cmd = [sys.executable, "-m", "simjax.main", "--config=configs/digits_t2i.py", f"--workdir={run_dir}",
           "--config.teacher.kind=checkpoint", f"--config.teacher.checkpoint={workdir / 'teacher' / 'final'}",
           f"--config.text.encoder={workdir / 'teacher' / 'text_encoder'}", f"--config.text.prompts={prompt_file}",
           f"--config.text.cache_dir={workdir / 'embeddings'}", f"--config.teacher.guidance={w}",
           f"--config.eval.guidance_sweep=({w},)"] + ([f"--config.num_steps={args.num_steps}"] if args.num_steps else [])
    proc = subprocess.run(cmd + extra, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
      print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
      sys.exit(proc.returncode)
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    row = {"guidance": w}
    for source in ("generator", "teacher"):
      for key in ("frechet_distance", "caption_accuracy", "attribute_accuracy", "nfe"):
        row[f"{source}_{key}"] = final[source].get(key)
    row["sim_train_seconds"] = final["generator"].get("sim_train_seconds")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
