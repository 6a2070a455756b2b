"""Shared fixtures: a tiny model config, and subprocess helpers for multi-device tests."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, devices: int = 1, env=None, timeout=600):
  """Runs `code` in a fresh interpreter with `devices` simulated CPU devices."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e.update(env or {})
  return subprocess.run([sys.executable, "-c", code], env=e, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def tiny_cfg():
  from ftjax.models import ModelConfig
  return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
