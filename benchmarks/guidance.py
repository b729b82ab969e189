"""Classifier-free guidance of a class-conditional digits teacher: label accuracy and FD per weight w.

    python -m simjax.main --config=configs/digits.py --workdir=/tmp/digits_cond --mode=train_teacher \
        --config.label_dim=10 --config.teacher_train.label_dropout=0.1
    python benchmarks/guidance.py --workdir=/tmp/digits_cond --weights=1,2,3 --num=2000

For each w, the teacher's Heun sampler (config.eval.teacher_steps) draws `num` samples with uniform
classes; the digit classifier (trained on the training split, cached in the workdir) scores how often
its prediction equals the conditioning class (label_accuracy) and the Frechet distance in its features
to the training digits. One JSON line per weight, plus the held-out digits' accuracy (the classifier's
own ceiling) and FD (the floor).
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a run whose teacher/final is class-conditional")
  parser.add_argument("--weights", default="1,2,3", help="comma-separated guidance weights")
  parser.add_argument("--num", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=7)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_threefry_partitionable", True)
  from simjax import config_files, data as data_lib  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import image_eval  # pylint: disable=import-outside-toplevel
  from simjax.teachers import edm_checkpoints  # pylint: disable=import-outside-toplevel
  from simjax.conditioning import CondSpace  # pylint: disable=import-outside-toplevel

  workdir = Path(args.workdir).resolve()
  teacher = edm_checkpoints.load_teacher(str(workdir / "teacher" / "final"))
  if not teacher.label_dim:
    raise SystemExit(f"{workdir}/teacher/final is unconditional; train one with --config.label_dim=10")
  config = config_files.load(REPO / "configs" / "digits.py").get_config()
  config.label_dim = teacher.label_dim
  mesh = mesh_lib.make_mesh((-1, 1))
  train, heldout = data_lib.load_splits(config)
  features = image_eval.make_features(config, workdir, train, mesh)
  ref = image_eval.reference_stats(config, features, train, mesh)
  batch = int(config.eval.batch_size)
  row = image_eval.measure(features, ref, heldout.x, np.asarray(heldout.labels, np.int32), 0,
                           int(config.eval.num_classes), mesh=mesh, batch_size=batch, num_samples=len(heldout.x))
  print(json.dumps({"source": "held-out digits", **{k: row[k] for k in ("frechet_distance", "label_accuracy")},
                    "num_samples": len(heldout.x)}), flush=True)
  for weight in (float(w) for w in args.weights.split(",")):
    config.teacher.guidance = weight
    out = image_eval.make_teacher_sampler(teacher.module, config, mesh, CondSpace(label_dim=teacher.label_dim))(
        teacher.params, args.num, args.seed, f"w={weight:g}")
    x = np.clip(out.x, -1.0, 1.0)
    row = image_eval.measure(features, ref, x, np.argmax(out.labels, -1).astype(np.int32),
                             2 * int(config.eval.teacher_steps) - 1, int(config.eval.num_classes), mesh=mesh, batch_size=batch,
                             num_samples=args.num)
    print(json.dumps({"source": "teacher", "guidance": weight, "frechet_distance": row["frechet_distance"],
                      "label_accuracy": row["label_accuracy"], "min_class_fraction": row["min_class_fraction"],
                      "num_samples": args.num, "teacher_steps": int(config.eval.teacher_steps)}), flush=True)


if __name__ == "__main__":
  main()
