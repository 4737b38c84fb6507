"""Run the 4 steps of a tiny phase 4 run on this process's devices and save the final state.

  JAX_NUM_CPU_DEVICES=2 python -m tests.phase4_steps OUT.npz [--save DIR STEP]
      [--restore DIR STEP]

With --restore the run starts from the checkpoint of STEP in DIR instead of step 0, and with
--save it writes a checkpoint when it reaches STEP. tests/test_phase4.py runs it in separate
processes with 1, 2 and 4 devices, since the device count is fixed when jax starts.
"""

import argparse

import jax
import numpy as np

from imputer import checkpointing
from imputer import sharding
from imputer import train
from tests import test_train

STEPS = 4


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--save', nargs=2, metavar=('DIR', 'STEP'))
  parser.add_argument('--restore', nargs=2, metavar=('DIR', 'STEP'))
  args = parser.parse_args()
  config = test_train.tiny_config(lambda_contrastive=0.5,
                                  **{'contrastive.queue_size': 20,
                                     'contrastive.momentum_schedule': 'cosine',
                                     'contrastive.momentum': 0.9, 'num_train_steps': STEPS})
  data = train.prepare_data(config)
  mesh = sharding.make_mesh()
  compiled = train.build_steps(config, data, mesh)
  state, first = compiled.state, 0
  if args.restore:
    # The restore target carries this process's shardings, whatever the saving run's were.
    manager = checkpointing.Checkpoints(args.restore[0], 5)
    state, _ = manager.restore_latest(checkpointing.abstract_like(state))
    manager.close()
    first = int(state.step)
    assert first == int(args.restore[1]), (first, args.restore)
  for step in range(first, STEPS):
    if args.save and step == int(args.save[1]):
      manager = checkpointing.Checkpoints(args.save[0], 5)
      manager.save(step, state, {})
      manager.wait()
      manager.close()
    rows = train.batch_rows(step, len(data.train), config.batch_size, config.seed)
    batch = sharding.to_global(data.train.take(sharding.process_rows(rows)), mesh)
    state, _ = compiled.train_step(state, batch)
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  np.savez(args.out, devices=len(jax.devices()), first=first,
           **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


if __name__ == '__main__':
  main()
