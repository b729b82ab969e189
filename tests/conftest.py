"""Test-wide settings: the RNG behaves as in training (partitionable threefry)."""
import os
import sys
from pathlib import Path

import jax

jax.config.update("jax_threefry_partitionable", True)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTHONUNBUFFERED", "1")
