"""Time N study variants in one compiled step against N separate runs of the same steps.

  python benchmarks/side_by_side.py --config=configs/phase7.py --variants=4 --steps=20

The script plans the study of `--config` as `launch.py` would and takes the first
`--variants` members of its first side-by-side group (the full model first, then ablations
and grid points that differ from it only in weights, the mask schedule or the positional
embedding). On one machine and the same prepared data it then measures:

* separately: for each member, its own step compiled as a single run compiles it
  (`train.build_steps`), then `--warmup` untimed and `--steps` timed steps;
* side by side: the group's vmapped step (`side_by_side.build_group`), compiled once, then
  the same warmup and timed steps for all members at once.

Every step builds its batch on the host as the training loop does. The clock stops after
`jax.block_until_ready`. Compile time is measured separately from step time, and the
speed-up is given both for the steps alone and for compile plus steps.
"""

import json
import os
import sys
import time

# `python benchmarks/side_by_side.py` puts only benchmarks/ on sys.path; the configs and the
# package are imported from the repository root.
_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY_ROOT not in sys.path:
  sys.path.insert(0, _REPOSITORY_ROOT)

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from imputer import sharding
from imputer import side_by_side
from imputer import study
from imputer import train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/phase7.py',
                                          'Path to a study config.', lock_config=True)
_VARIANTS = flags.DEFINE_integer('variants', 4, 'Members of the first group to time.',
                                 lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed training steps.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.', lower_bound=0)
_JSON_OUT = flags.DEFINE_string('json_out', None, 'If set, also write the figures here.')


def host_batch(config, data, mesh, step: int):
  return next(train.train_batches(config, data, mesh, step, step + 1))


def timed_steps(step_fn, state, config, data, mesh, warmup: int, steps: int):
  """Run `warmup` then `steps` steps with host batch assembly; return seconds of the latter."""
  for step in range(warmup):
    state, _ = step_fn(state, host_batch(config, data, mesh, step))
  jax.block_until_ready(state)
  start = time.perf_counter()
  metrics = None
  for step in range(warmup, warmup + steps):
    state, metrics = step_fn(state, host_batch(config, data, mesh, step))
  jax.block_until_ready((state, metrics))
  return time.perf_counter() - start


def time_separate(member, data, mesh, warmup: int, steps: int) -> dict:
  config = member.config
  built = train.build_steps(config, data, mesh)
  start = time.perf_counter()
  compiled = built.train_step.lower(built.state, host_batch(config, data, mesh, 0)).compile()
  compile_s = time.perf_counter() - start
  seconds = timed_steps(compiled, built.state, config, data, mesh, warmup, steps)
  return {'variant': member.variant.name, 'compile_s': compile_s, 'steps_s': seconds}


def time_group(group, data, mesh, warmup: int, steps: int) -> dict:
  built = side_by_side.build_group(group, data, mesh)
  config = group.structure
  start = time.perf_counter()
  compiled = built.train_step.lower(built.state, host_batch(config, data, mesh, 0),
                                    built.hyper).compile()
  compile_s = time.perf_counter() - start
  step_fn = lambda state, batch: compiled(state, batch, built.hyper)
  seconds = timed_steps(step_fn, built.state, config, data, mesh, warmup, steps)
  return {'compile_s': compile_s, 'steps_s': seconds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  variants = study.plan(config)
  groups = side_by_side.plan_groups(config, variants, '/nonexistent')
  first = groups[0]
  if len(first.members) < _VARIANTS.value:
    raise ValueError(f'--variants={_VARIANTS.value}, but the first side-by-side group of this '
                     f'study has {len(first.members)} members; lower --variants or add grid '
                     'points or ablations that differ only in loss weights.')
  members = first.members[:_VARIANTS.value]
  group = side_by_side.Group(first.name, members,
                             side_by_side.structure_config([m.config for m in members]), '')
  data = train.prepare_data(group.structure)
  mesh = sharding.make_mesh(config.mesh)
  names = [m.variant.name for m in group.members]
  print(f'Variants: {", ".join(names)}')
  print(f'Devices: {jax.device_count()} x {jax.devices()[0].device_kind} | '
        f'jax {jax.__version__} | batch {group.structure.batch_size} | '
        f'{_STEPS.value} timed steps after {_WARMUP.value} warmup')

  separate = [time_separate(m, data, mesh, _WARMUP.value, _STEPS.value)
              for m in group.members]
  together = time_group(group, data, mesh, _WARMUP.value, _STEPS.value)
  for run in separate:
    print(f'  separate  {run["variant"]:<40} compile {run["compile_s"]:7.1f} s | '
          f'{_STEPS.value} steps {run["steps_s"]:7.2f} s')
  sep_compile = sum(r['compile_s'] for r in separate)
  sep_steps = sum(r['steps_s'] for r in separate)
  print(f'Separate, all {len(separate)}: compile {sep_compile:.1f} s | steps {sep_steps:.2f} s '
        f'| total {sep_compile + sep_steps:.1f} s')
  print(f'Side by side:    compile {together["compile_s"]:.1f} s | steps '
        f'{together["steps_s"]:.2f} s | total {together["compile_s"] + together["steps_s"]:.1f} s')
  figures = {
      'variants': names, 'steps': _STEPS.value, 'warmup': _WARMUP.value,
      'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
      'jax': jax.__version__, 'batch_size': group.structure.batch_size,
      'separate': separate, 'side_by_side': together,
      'speedup_steps': sep_steps / together['steps_s'],
      'speedup_total': (sep_compile + sep_steps) / (together['compile_s']
                                                   + together['steps_s']),
      'variant_steps_per_s_separate': len(separate) * _STEPS.value / sep_steps,
      'variant_steps_per_s_side_by_side': len(separate) * _STEPS.value / together['steps_s'],
  }
  print(f'Speed-up: steps {figures["speedup_steps"]:.2f}x | compile and steps '
        f'{figures["speedup_total"]:.2f}x | variant-steps/s separate '
        f'{figures["variant_steps_per_s_separate"]:.2f}, side by side '
        f'{figures["variant_steps_per_s_side_by_side"]:.2f}')
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w', encoding='utf-8') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  app.run(main)
