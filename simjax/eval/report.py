"""The workdir files tools read by contract (DESIGN.md section 2): eval/*.json, samples/*.npz, PNGs.

Every file is written whole (`storage.atomic_write_bytes`), so a reader never sees half a file, and
only process 0 writes.
"""
import io
import json
from typing import Optional, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from simjax import storage


def write_json(path, obj):
  if jax.process_index() != 0:
    return
  storage.atomic_write_bytes(epath.Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_final(workdir, results: dict, name: str = "final.json"):
  """eval/final.json: {"generator": {...}, "teacher": {...}, "reference": {...}}."""
  write_json(epath.Path(workdir) / "eval" / name, results)


def write_samples(workdir, name: str, x: np.ndarray, labels: Optional[np.ndarray] = None, prompts=None):
  """samples/<name>.npz with key `x` (data's own layout and range), `labels` when class-conditional and
  `prompts` (one string per row) when text-conditioned."""
  if jax.process_index() != 0:
    return
  arrays = {"x": np.asarray(x)}
  if labels is not None:
    arrays["labels"] = np.asarray(labels)
  if prompts is not None:
    arrays["prompts"] = np.asarray([str(p) for p in prompts])
  storage.atomic_write_npz(epath.Path(workdir) / "samples" / f"{name}.npz", **arrays)


def write_png(path, image: Image.Image):
  if jax.process_index() != 0:
    return
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  storage.atomic_write_bytes(epath.Path(path), buf.getvalue())


def scatter_panels(panels: Sequence[tuple], size: int = 360, max_points: int = 5000) -> Image.Image:
  """Side-by-side 2-D scatter plots [(title, points [N, 2]), ...] on shared axes."""
  pts = np.concatenate([np.asarray(p)[:max_points] for _, p in panels])
  lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
  pad = 0.1 * (hi - lo).max()
  lo, hi = lo - pad, hi + pad
  span = (hi - lo).max()
  img = Image.new("RGB", (size * len(panels), size + 20), "white")
  draw = ImageDraw.Draw(img)
  for i, (title, p) in enumerate(panels):
    p = np.asarray(p)[:max_points]
    uv = (p - lo) / span * (size - 10) + 5
    for u, v in uv:
      x, y = i * size + u, 20 + size - v
      draw.point((x, y), fill=(30, 70, 160))
    draw.text((i * size + 8, 4), title, fill="black")
    draw.line([(i * size, 0), (i * size, size + 20)], fill=(200, 200, 200))
  return img


def image_grid(images: np.ndarray, cols: int, value_range=(-1.0, 1.0), pad: int = 1, scale: int = 1) -> Image.Image:
  """NHWC images in value_range -> one uint8 grid image."""
  x = (np.asarray(images, np.float32) - value_range[0]) / (value_range[1] - value_range[0])
  x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
  n, h, w, c = x.shape
  rows = -(-n // cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
  img = Image.fromarray(grid[..., 0] if c == 1 else grid)
  return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def captioned_grid(images: np.ndarray, captions: Sequence[str], cols: int, value_range=(-1.0, 1.0),
                   cell: int = 96, text_lines: int = 3) -> Image.Image:
  """NHWC images, each upscaled to `cell` pixels with its caption wrapped under it (text-to-image grids)."""
  import textwrap  # pylint: disable=import-outside-toplevel
  n = len(images)
  rows = -(-n // cols)
  line_h, chars = 11, max(8, cell // 6)
  cell_h = cell + 4 + line_h * text_lines
  canvas = Image.new("RGB", (cols * (cell + 6) + 6, rows * (cell_h + 6) + 6), "white")
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, q = divmod(i, cols)
    x0, y0 = 6 + q * (cell + 6), 6 + r * (cell_h + 6)
    tile = image_grid(images[i:i + 1], 1, value_range, pad=0).convert("RGB").resize((cell, cell), Image.NEAREST)
    canvas.paste(tile, (x0, y0))
    lines = textwrap.wrap(str(captions[i]), chars)[:text_lines]
    for j, line in enumerate(lines):
      draw.text((x0, y0 + cell + 2 + j * line_h), line, fill="black")
  return canvas
