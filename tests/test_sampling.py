"""The batched sampler: the same samples and labels on any mesh, equal to drawing each global batch directly."""
import os
import subprocess
import sys
import textwrap

from conftest import REPO

# 4 fake CPU devices need a fresh process (the device count is fixed when JAX starts).
_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_threefry_partitionable", True)
    import jax.numpy as jnp, numpy as np
    from simjax import sampling
    from simjax.errors import UserError
    from simjax.parallel import mesh as mesh_lib
    from simjax.conditioning import CondSpace

    W = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)), jnp.float32)
    def batch_fn(p, z, labels):  # each row depends on its own latent and label only
      return jnp.tanh(z @ p) + labels[:, :6] * 3.0
    def denoise(p, x, s, labels):
      return x * p / (1.0 + s[:, None, None]) + labels[:, :1, None]

    # Direct draws: global batch i from fold_in(key(seed), i), as documented.
    xs, ls = [], []
    for i in range(3):
      k_z, k_l = jax.random.split(jax.random.fold_in(jax.random.key(3), i))
      z, l = jax.random.normal(k_z, (8, 6)), CondSpace(label_dim=10).draw(k_l, 8)
      xs.append(np.asarray(batch_fn(W, z, l))); ls.append(np.asarray(l))
    want_x, want_l = np.concatenate(xs)[:19], np.concatenate(ls)[:19]

    heun = []
    meshes = [mesh_lib.make_mesh((-1, 1)), mesh_lib.make_mesh((2, 2)), mesh_lib.make_mesh((1, 1), jax.devices()[:1])]
    for mesh in meshes:
      fn = jax.jit(sampling.shard_rows(batch_fn, mesh))
      out = sampling.sample(fn, sampling.replicate(W, mesh), num=19, batch_size=8, seed=3, data_shape=(6,),
                            cond_space=CondSpace(label_dim=10), mesh=mesh)
      np.testing.assert_allclose(out.x, want_x, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(out.labels, want_l)
      assert out.local_x.shape == (19, 6) and out.local_labels.shape == (19, 10)
      teacher = sampling.make_heun_batch_fn(denoise, mesh, num_steps=3)
      heun.append(sampling.sample(teacher, jnp.float32(0.9), num=10, batch_size=4, seed=1, data_shape=(2, 2),
                                  cond_space=CondSpace(label_dim=3), mesh=mesh, describe="heun"))
      unconditional = sampling.sample(lambda p, z, l: jnp.tanh(z @ p), sampling.replicate(W, mesh), num=5,
                                      batch_size=4, seed=3, data_shape=(6,), cond_space=CondSpace(), mesh=mesh)
      assert unconditional.labels is None and unconditional.x.shape == (5, 6)
    for h in heun[1:]:
      np.testing.assert_allclose(h.x, heun[0].x, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(h.labels, heun[0].labels)
    assert len(np.unique(heun[0].x.reshape(10, -1), axis=0)) == 10
    try:
      sampling.sample(fn, W, num=4, batch_size=6, seed=0, data_shape=(6,), cond_space=CondSpace(), mesh=meshes[0])
      raise SystemExit("batch 6 over 4 devices was accepted")
    except UserError as error:
      assert "multiple of 4" in str(error), error
    print("OK")
""")


def test_samples_and_labels_are_the_same_on_every_mesh():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout[-2000:] + result.stderr[-3000:]
  # Progress lines: "heun: batch 3/3 (10/10 samples, ...)".
  assert "heun: batch 3/3 (10/10 samples" in result.stdout


