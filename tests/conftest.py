"""Test session settings: one persistent XLA compilation cache for the whole session.

Many tests compile the same programs (the same tiny configs in several modes, and the
launcher subprocesses). The cache lives in a fresh temporary folder, so a session never reads
programs compiled by another one; subprocesses find it through the environment.
"""

import os
import tempfile

import jax

_CACHE = tempfile.mkdtemp(prefix='imputer-test-xla-cache-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


import pytest  # noqa: E402  (after the cache settings, which must come first)

from imputer import synthetic  # noqa: E402
from imputer import train  # noqa: E402
from tests import helpers  # noqa: E402


class TrainedRun:
  """A tiny run trained on a synthetic CMI-schema CSV: its workdir, CSV path and frame."""

  def __init__(self, workdir, csv, frame, config):
    self.workdir, self.csv, self.frame, self.config = workdir, csv, frame, config


def tiny_cmi_config(path):
  """Return phase 1 (conf_mae) with a per-value variance head, trained for 8 steps."""
  return helpers.tiny_config(**{
      'data.path': str(path), 'model.variance_head': True, 'num_train_steps': 8,
      'log_every_steps': 4, 'eval_every_steps': 4, 'checkpoint_every_steps': 4})


@pytest.fixture(scope='session')
def trained_cmi_run(tmp_path_factory):
  """Train once per session on 4 subjects x 4 labelled sequences, 4 of them IMU-only."""
  root = tmp_path_factory.mktemp('trained_cmi_run')
  frame = synthetic.generate_cmi_frame(num_subjects=4, sequences_per_subject=4, min_length=20,
                                       max_length=90, imu_only_fraction=0.25, seed=3)
  csv = root / 'train.csv'
  frame.write_csv(csv)
  config = tiny_cmi_config(csv)
  train.train_and_evaluate(config, str(root / 'run'))
  return TrainedRun(str(root / 'run'), str(csv), frame, config)
