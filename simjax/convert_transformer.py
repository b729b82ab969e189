"""Converts a PixArt-alpha or DiT checkpoint into a simjax checkpoint directory, once.

    python -m simjax.convert_transformer PixArt-alpha/PixArt-XL-2-512x512 OUT_DIR   # a diffusers pipeline
    python -m simjax.convert_transformer PixArt-XL-2-512x512.pth OUT_DIR             # PixArt's original file
    python -m simjax.convert_transformer DiT-XL-2-256x256.pt OUT_DIR
    python -m simjax.convert_transformer sim_pixart.pt OUT_DIR --arch '{"num_heads": 16}'

IN is a diffusers pipeline directory or transformer folder, an original PixArt .pth, SIM's released
.pt or DiT's .pt (read without torch and without running code from them). OUT_DIR receives arch.json
(architecture and noise schedule) + params/ (orbax, with PixArt's learned null caption when the file
has one); `simjax.load_teacher(OUT_DIR)` reads it. Any error prints one line and exits with status 2,
writing nothing.
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m simjax.convert_transformer",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("input", help="diffusers pipeline / transformer folder, or an original .pth/.pt")
  parser.add_argument("out_dir", help="output directory (must not exist, or be empty)")
  parser.add_argument("--arch", default=None,
                      help="JSON object of DiffusionTransformer fields overriding what is read (e.g. num_heads)")
  args = parser.parse_args(argv)

  # Heavy imports after argument parsing so that `--help` is instant.
  from simjax import torch_files  # pylint: disable=import-outside-toplevel
  from simjax.networks.precond import count_params  # pylint: disable=import-outside-toplevel
  from simjax.teachers import edm_checkpoints, transformer_checkpoints as tc  # pylint: disable=import-outside-toplevel

  try:
    arch = json.loads(args.arch) if args.arch else None
    if arch is not None and not isinstance(arch, dict):
      raise ValueError(f"--arch must be a JSON object, got {args.arch!r}.")
    out_dir = Path(args.out_dir)
    edm_checkpoints.check_output_dir(out_dir)  # before the (slow) read: a taken OUT_DIR fails at once
    source = Path(args.input)
    if tc.is_transformer_checkpoint(source):
      read = tc.read_any(source, arch=arch)
    elif source.is_file():
      state = torch_files.load_state_dict(source)
      if not tc.is_transformer_state(state):
        raise ValueError(f"{source} holds no PixArt/DiT patch embedding (x_embedder.proj.weight); for EDM "
                         "checkpoints use `python -m simjax.convert_edm`.")
      read = tc.read_any(source, arch=arch, state=state)
    else:
      raise FileNotFoundError(f"{source} is neither a diffusers PixArt/DiT folder nor a checkpoint file.")
    arch, schedule, variables, null_caption = read
    tc.save_converted(out_dir, arch, schedule, variables, null_caption)
  except (ValueError, OSError) as e:
    message = " ".join(str(e).split())  # one line, whatever the exception text holds
    print(f"convert_transformer: error: {message}", file=sys.stderr)
    return 2
  print(f"architecture: {json.dumps(arch, sort_keys=True)}")
  print(f"noise schedule: {json.dumps(schedule, sort_keys=True)}")
  print(f"parameters: {count_params(variables['params']):,}"
        + ("" if null_caption is None else f"; learned null caption {list(null_caption.shape)}"))
  print(f"wrote {out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
