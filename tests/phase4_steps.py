"""Run a few phase 4 train steps on this process's devices and save the final state.

  JAX_NUM_CPU_DEVICES=2 python -m tests.phase4_steps OUT.npz

Used by tests/test_phase4.py to compare 1 and 2 devices in separate processes, since the
device count is fixed when jax starts.
"""

import sys

import jax
import numpy as np

from imputer import sharding
from imputer import train
from tests import test_train


def main(path: str) -> None:
  config = test_train.tiny_config(lambda_contrastive=0.5,
                                  **{'contrastive.queue_size': 20,
                                     'contrastive.momentum_schedule': 'cosine',
                                     'contrastive.momentum': 0.9, 'num_train_steps': 4})
  data = train.prepare_data(config)
  mesh = sharding.make_mesh()
  compiled = train.build_steps(config, data, mesh)
  state = compiled.state
  for step in range(4):
    rows = train.batch_rows(step, len(data.train), config.batch_size, config.seed)
    batch = sharding.to_global(data.train.take(sharding.process_rows(rows)), mesh)
    state, _ = compiled.train_step(state, batch)
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  np.savez(path, devices=len(jax.devices()),
           **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


if __name__ == '__main__':
  main(sys.argv[1])
