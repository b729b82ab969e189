"""Test-wide settings: the RNG behaves as in training (partitionable threefry); FIXTURES, the parity fixtures."""
import os
import sys
from pathlib import Path

import jax

jax.config.update("jax_threefry_partitionable", True)

REPO = Path(__file__).resolve().parents[1]
# EDM and Inception reference outputs, in the repository (tests/fixtures/README.md says how they were made).
FIXTURES = REPO / "tests" / "fixtures"
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTHONUNBUFFERED", "1")
