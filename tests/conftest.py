"""Test setup: 8 fake CPU devices (set before JAX starts) and the bundled fixture."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "bagel_tiny_a"


def rel_err(ours, ref) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
  return FIXTURE_DIR


@pytest.fixture(scope="session")
def cases() -> dict[str, np.ndarray]:
  with np.load(FIXTURE_DIR / "cases.npz") as d:
    return {k: d[k] for k in d.files}
