"""Converts an EDM checkpoint into a simjax checkpoint directory.

    python -m simjax.convert_edm IN.pkl OUT_DIR
    python -m simjax.convert_edm weights.pt OUT_DIR --arch arch.json

IN is an EDM network pickle (read without running code from it), or a `.pt/.pth/.npz` state dict
whose architecture comes from `--arch`, an adjacent arch.json or the .npz's config_json. OUT_DIR
receives arch.json + params/ (orbax), and for EDM2's latent networks latents.json (the latent
normalisation of the pickle's encoder); configs reference OUT_DIR by path and load it with
`simjax.load_teacher(OUT_DIR)`. Any error prints one line and exits with status 2, writing nothing.
"""
import argparse
import json
import sys
from pathlib import Path


def _arch_summary(arch) -> str:
  shown = dict(arch)
  if "fourier_freqs" in shown:
    shown["fourier_freqs"] = f"<{len(shown['fourier_freqs'])} frequencies from the checkpoint>"
  return json.dumps(shown, sort_keys=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m simjax.convert_edm", description=__doc__.split("\n\n")[0])
  parser.add_argument("input", help="EDM network pickle (.pkl) or state dict (.pt/.pth/.npz)")
  parser.add_argument("out_dir", help="output directory (must not exist, or be empty)")
  parser.add_argument("--arch", default=None, help="JSON file with EDM precond kwargs, for bare state dicts")
  args = parser.parse_args(argv)

  # Heavy imports after argument parsing so that `--help` is instant.
  from simjax.teachers import edm_checkpoints  # pylint: disable=import-outside-toplevel
  from simjax.networks.precond import count_params  # pylint: disable=import-outside-toplevel

  try:
    out_dir = Path(args.out_dir)
    edm_checkpoints.check_output_dir(out_dir)  # before the (slow) read: a taken OUT_DIR fails at once
    arch, variables, latents = edm_checkpoints.read_edm_source(args.input, arch=args.arch)  # latents: EDM2's
    edm_checkpoints.save_converted(out_dir, arch, variables, latents=latents)
  except (ValueError, OSError) as e:
    message = " ".join(str(e).split())  # one line, whatever the exception text holds
    print(f"convert_edm: error: {message}", file=sys.stderr)
    return 2
  print(f"architecture: {_arch_summary(arch)}")
  print(f"parameters: {count_params(variables['params']):,}")
  print(f"wrote {out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
