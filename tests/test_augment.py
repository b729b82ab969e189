"""EDM's geometric augmentation (simjax.data.augment): labels, each transform's effect, statistics, jit.

Expected images come from numpy's own flips, rolls and rotations, never from the module under test;
the optional torch check resamples through torch's reflect padding, transposed convolution and
grid_sample (the primitives EDM's AugmentPipe is built on) at the same parameters.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simjax.data import augment as A
from simjax.errors import UserError

H = W = 32


def _noise(n=4, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, H, W, 3)).astype(np.float32)


def _smooth(seed=0):
  """A band-limited image: low-frequency sinusoids, so resampling filters barely touch it."""
  rng = np.random.RandomState(seed)
  yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  img = np.zeros((H, W, 3), np.float32)
  for c in range(3):
    for _ in range(3):
      fy, fx, ph = rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0, 2 * np.pi)
      img[..., c] += np.cos(fy * yy + fx * xx + ph) / 3
  return img


def _params(**values):
  return A.identity_params()._replace(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def test_symlet6_is_orthonormal():
  h = A.SYM6
  assert abs(h.sum() - math.sqrt(2)) < 1e-12
  for m in range(len(h) // 2):
    assert abs(np.dot(h[:len(h) - 2 * m], h[2 * m:]) - (m == 0)) < 1e-9


def test_p_zero_is_identity_with_zero_labels():
  x = _noise(8)
  out, labels = A.augment(jax.random.key(0), jnp.asarray(x), p=0.0)
  assert labels.shape == (8, 9) and labels.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(labels), 0.0)
  np.testing.assert_array_equal(np.asarray(out), x)


def test_identity_warp_is_identity_up_to_rounding():
  # EDM resamples even unmoved images; the orthonormal filter makes that the identity.
  x = _noise(1)[0]
  np.testing.assert_allclose(np.asarray(A.warp(jnp.asarray(x), jnp.eye(3))), x, atol=2e-6)


def test_label_layout_per_transform():
  p = _params(xflip=1, yflip=1, scale=0.5, rotate=0.3, aniso=-0.7, aniso_angle=1.1, translate=[0.25, -2.0])
  got = np.asarray(A.params_to_labels(p))
  want = [1, 1, 0.5, math.cos(0.3) - 1, math.sin(0.3), -0.7 * math.cos(1.1), -0.7 * math.sin(1.1), 0.25, -2.0]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # A zero multiplier drops its label group, as EDM builds its label vector.
  assert A.augment_label_dim() == 9 and A.augment_label_dim(aniso=0, yflip=0) == 6
  np.testing.assert_allclose(np.asarray(A.params_to_labels(p, aniso=0, yflip=0)), [want[i] for i in (0, 2, 3, 4, 7, 8)],
                             rtol=1e-6, atol=1e-7)


def test_xflip_and_yflip_flip_exactly():
  x = _noise(1)[0]
  np.testing.assert_array_equal(np.asarray(A.apply_params(jnp.asarray(x), _params(xflip=1))), x[:, ::-1])
  np.testing.assert_array_equal(np.asarray(A.apply_params(jnp.asarray(x), _params(yflip=1))), x[::-1])
  # Through augment with only x-flips enabled: each image is flipped exactly when its label says so.
  xs = _noise(16)
  out, labels = A.augment(jax.random.key(3), jnp.asarray(xs), p=0.12, yflip=0, scale=0, rotate_frac=0, aniso=0,
                          translate_frac=0)
  labels = np.asarray(labels)
  assert labels.shape == (16, 1) and set(np.unique(labels)) == {0.0, 1.0}
  want = np.where(labels[:, :, None, None] > 0, xs[:, :, ::-1], xs)
  np.testing.assert_array_equal(np.asarray(out), want)


def test_integer_translation_shifts_with_reflect_padding():
  x = _noise(1)[0]
  # wx = 1 -> 1 * 32 * 0.125 = +4 px right; wy = -0.5 -> 2 px up.
  p = _params(translate=[1.0, -0.5])
  out = np.asarray(A.apply_params(jnp.asarray(x), p))
  padded = np.pad(x, ((8, 8), (8, 8), (0, 0)), mode="reflect")  # numpy 'reflect' = mirror without the edge
  want = padded[8 + 2: 8 + 2 + H, 8 - 4: 8 - 4 + W]
  np.testing.assert_allclose(out, want, atol=2e-6)
  np.testing.assert_allclose(np.asarray(A.params_to_labels(p))[7:], [1.0, -0.5])


def test_quarter_turn_rotates_counterclockwise():
  x = _smooth()
  p = _params(rotate=math.pi / 2)
  out = np.asarray(A.apply_params(jnp.asarray(x), p))
  # out[i, j] = x[j, W-1-i]: the content turns a quarter counter-clockwise as displayed (numpy rot90).
  err = np.abs(out - np.rot90(x, 1, axes=(0, 1))).max()
  err_other_way = np.abs(out - np.rot90(x, -1, axes=(0, 1))).max()
  assert err < 0.02 < 0.5 < err_other_way, (err, err_other_way)
  np.testing.assert_allclose(np.asarray(A.params_to_labels(p))[3:5], [-1.0, 1.0], atol=1e-6)


def test_isotropic_scale_zooms_about_the_centre():
  # w = 5 -> s = 2^(0.2 * 5) = 2: output pixel p reads the input at p / 2 (zoom in).
  yy, xx = np.meshgrid(np.arange(H) - (H - 1) / 2, np.arange(W) - (W - 1) / 2, indexing="ij")
  ramp = lambda a, b: (0.03 * a + 0.05 * b).astype(np.float32)[..., None].repeat(3, -1)
  out = np.asarray(A.apply_params(jnp.asarray(ramp(yy, xx)), _params(scale=5.0)))
  inner = out[6:-6, 6:-6]
  # The zoom halves a linear ramp's slopes exactly away from the reflected border ...
  np.testing.assert_allclose(np.diff(inner, axis=1), 0.025, atol=2e-5)
  np.testing.assert_allclose(np.diff(inner, axis=0), 0.015, atol=2e-5)
  # ... about the centre, up to the asymmetric symlet filter's sub-pixel phase (EDM's too: ~0.05 px).
  np.testing.assert_allclose(inner, ramp(yy / 2, xx / 2)[6:-6, 6:-6], atol=3e-3)


def test_label_statistics_match_probabilities():
  n = 20000
  keys = jax.random.split(jax.random.key(7), n)
  prm = jax.vmap(lambda k: A.draw_params(k, 0.12))(keys)
  labels = np.asarray(jax.vmap(A.params_to_labels)(prm))
  nonzero = labels != 0
  tol = 5 * math.sqrt(0.25 / n)  # five binomial standard deviations at worst (q = 1/2)
  assert abs(nonzero[:, 0].mean() - 0.5) < tol            # x-flip: always considered, flipped half the time
  assert abs(nonzero[:, 1].mean() - 0.06) < tol           # y-flip: p, then half the time
  for col in (2, 4, 5, 7, 8):                              # scale, rotation, aniso (w cos r), translations
    assert abs(nonzero[:, col].mean() - 0.12) < tol, col
  np.testing.assert_array_equal(nonzero[:, 7], nonzero[:, 8])  # both translation offsets apply together
  applied = nonzero[:, 2]
  assert abs(labels[applied, 2].std() - 1) < 0.06          # scale w ~ N(0, 1) when applied
  rot = np.asarray(prm.rotate)[np.asarray(prm.rotate) != 0]
  assert rot.min() > -math.pi and rot.max() < math.pi and abs(np.abs(rot).mean() - math.pi / 2) < 0.1
  angle = np.asarray(prm.aniso_angle)
  assert abs((angle != 0).mean() - 0.5) < tol              # aniso direction used half the time


def test_deterministic_in_the_key():
  x = jnp.asarray(_noise(8))
  a = A.augment(jax.random.key(11), x, p=1.0)
  b = A.augment(jax.random.key(11), x, p=1.0)
  c = A.augment(jax.random.key(12), x, p=1.0)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert np.abs(np.asarray(a[1]) - np.asarray(c[1])).max() > 0.1


def test_jits_on_a_cifar_batch():
  x = jnp.asarray(_noise(16))
  fn = jax.jit(lambda k, imgs, p: A.augment(k, imgs, p))
  out, labels = fn(jax.random.key(5), x, 0.12)  # p traced
  assert out.shape == (16, H, W, 3) and out.dtype == jnp.float32 and labels.shape == (16, 9)
  assert np.isfinite(np.asarray(out)).all()
  # Images drawn with no transform at all pass through bit-exactly (EDM: identity up to rounding).
  untouched = ~np.asarray(labels).any(1)
  assert untouched.any() and not untouched.all()
  np.testing.assert_array_equal(np.asarray(out)[untouched], np.asarray(x)[untouched])


def _torch_warp(torch, image, g_inv):
  """Reference resampling in torch: reflect pad, symlet-6 2x up (transposed conv), grid_sample, 2x down."""
  f = torch.nn.functional
  c = image.shape[-1]
  img = torch.tensor(image).permute(2, 0, 1)[None].double()
  pad = f.pad(img, (W - 1, W - 1, H - 1, H - 1), mode="reflect")
  hp, wp = pad.shape[-2:]
  h = torch.tensor(A.SYM6)
  kernel = (h[:, None] * h[None, :])[None, None].repeat(c, 1, 1, 1)
  # Up-sample k sits at padded pixel k / 2: u[k] = sum_i x[i] h[k + 5 - 2i] is the transposed conv shifted by 5.
  up = f.conv_transpose2d(pad, kernel, stride=2, groups=c)[..., 5:5 + 2 * hp, 5:5 + 2 * wp]
  # 2x output grid, 3 pixels past each edge, in pixels centred on the image.
  q = lambda n: np.arange(2 * (n + 6)) / 2 - 3 - (n - 1) / 2
  py, px = np.meshgrid(q(H), q(W), indexing="ij")
  src = np.einsum("ij,jhw->ihw", g_inv, np.stack([px, py, np.ones_like(px)]))
  ux, uy = 2 * (src[0] + (W - 1) / 2 + W - 1), 2 * (src[1] + (H - 1) / 2 + H - 1)
  # grid_sample(align_corners=False): pixel index i <-> normalised (2 i + 1) / size - 1.
  grid = np.stack([(2 * ux + 1) / up.shape[-1] - 1, (2 * uy + 1) / up.shape[-2] - 1], -1)[None]
  sampled = f.grid_sample(up, torch.tensor(grid), mode="bilinear", padding_mode="zeros", align_corners=False)
  down = f.conv2d(sampled[..., 1:, 1:], kernel, stride=2, groups=c)[..., :H, :W]
  return down[0].permute(1, 2, 0).numpy()


def test_resampling_matches_torch_grid_sample():
  torch = pytest.importorskip("torch", reason="optional cross-check against torch's grid_sample")
  x = _noise(1, seed=4)[0]
  cases = [_params(scale=-1.3, rotate=0.7, aniso=0.9, aniso_angle=-2.0, translate=[0.3, -0.6]),
           _params(scale=1.5, rotate=-2.9, translate=[-1.2, 0.4]),
           _params(rotate=math.pi / 4)]
  for p in cases:
    g_inv = np.asarray(A.inverse_affine(p, H, W), np.float64)
    got = np.asarray(A.apply_params(jnp.asarray(x), p))
    np.testing.assert_allclose(got, _torch_warp(torch, x, g_inv), atol=5e-5)


def test_inverse_affine_composition():
  # Translation alone: reading at p - t; rotation alone: EDM's R(w) applied to output coordinates.
  t = np.asarray(A.inverse_affine(_params(translate=[1.0, 2.0]), H, W))
  np.testing.assert_allclose(t, [[1, 0, -4], [0, 1, -8], [0, 0, 1]], atol=1e-6)
  r = np.asarray(A.inverse_affine(_params(rotate=0.4), H, W))
  np.testing.assert_allclose(r[:2, :2], [[math.cos(0.4), -math.sin(0.4)], [math.sin(0.4), math.cos(0.4)]], atol=1e-6)
  # Anisotropic scale 2^(0.2 w) along the direction r = pi/2 (the y axis): G_inv = diag(a, 1/a).
  a = 2 ** (0.2 * 1.5)
  g = np.asarray(A.inverse_affine(_params(aniso=1.5, aniso_angle=math.pi / 2), H, W))
  np.testing.assert_allclose(g[:2, :2], np.diag([a, 1 / a]), atol=1e-6)


def test_bad_inputs_raise_user_errors():
  with pytest.raises(UserError, match="NHWC"):
    A.augment(jax.random.key(0), jnp.zeros((32, 32, 3)))
  with pytest.raises(UserError, match="unknown augmentation"):
    A.augment(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), hue=1)
  with pytest.raises(UserError, match="negative"):
    A.augment(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), scale=-1)
