"""The non-finite streak is enforced at every step, not only at log and checkpoint steps."""
import jax
import jax.numpy as jnp
import pytest

from simjax.training import checkpoint as ckpt_lib
from simjax.training import loop as loop_lib


class _State(dict):
  """A minimal train state: the loop reads .step and .nonfinite."""

  @property
  def step(self):
    return self["step"]

  @property
  def nonfinite(self):
    return self["nonfinite"]


jax.tree_util.register_pytree_node(_State, lambda s: ((dict(s),), None), lambda _, c: _State(c[0]))


def _streak_step(bad_from: int):
  """A step whose every iteration from step `bad_from` on is non-finite (the streak grows by one each)."""
  @jax.jit
  def step(state, consts):
    del consts
    bad = state["step"] >= bad_from
    streak = jnp.where(bad, state["nonfinite"]["streak"] + 1, 0)
    nonfinite = {"streak": streak, "max_streak": jnp.maximum(state["nonfinite"]["max_streak"], streak),
                 "total": state["nonfinite"]["total"] + bad.astype(jnp.int32)}
    new = _State(step=state["step"] + 1, nonfinite=nonfinite)
    return new, {"loss": jnp.where(bad, jnp.nan, 1.0), "nonfinite_streak": streak}
  return step


def _run(tmp_path, limit, num_steps=200, bad_from=10):
  zero = jnp.zeros((), jnp.int32)
  state = _State(step=zero, nonfinite={"streak": zero, "max_streak": zero, "total": zero})
  step = _streak_step(bad_from)
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints", interval=1000)
  try:
    return loop_lib.run_loop(state=state, step_fn=lambda _: step, consts=None, num_steps=num_steps,
                             checkpointer=checkpointer, writer=loop_lib.MetricWriter(tmp_path),
                             log_every=1000, max_nonfinite_streak=limit, stage="sim")
  finally:
    checkpointer.close()


def test_a_streak_stops_the_run_between_log_steps(tmp_path):
  # Steps 11.. are non-finite: a limit of 5 is reached at step 15, long before any log (every 1000).
  with pytest.raises(loop_lib.NonFiniteError, match=r"consecutive steps had a non-finite") as e:
    _run(tmp_path / "a", limit=5)
  by_step = int(str(e.value).split("(by step ")[1].split(";")[0])
  assert 15 <= by_step <= 18, str(e.value)  # at most a few steps after the limit (counters arrive asynchronously)


def test_short_streaks_do_not_stop_the_run(tmp_path):
  # The control: the same run with a limit above the streak it reaches finishes.
  state, status = _run(tmp_path / "b", limit=50, num_steps=40, bad_from=30)
  assert status == "done" and int(state.step) == 40
