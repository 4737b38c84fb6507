"""Time variants of the training step side by side, in alternating blocks in one process.

  python benchmarks/step_variants.py --config=configs/phase0.py --steps=60 --rounds=6

It takes the flags of train_step.py (--config, --steps, --warmup, --rounds, --json_out) and
--variants.

The variants are the changes of the profile-guided pass on the train step, each measured
against the code before it:

- `before`: the step as it was before the pass. The local convolution of the embedding is
  a grouped `nn.Conv`, and every hidden mask is mapped to features by multiplying it with the
  dependency matrices, the identity matrix of the 320 ToF pixels included.
- `conv_only`: only the local convolution as shifted sums (`models.DepthwiseConv1D`).
- `after`: the code as it is, with both changes.
- `bfloat16`: `after` with `--config.model.compute_dtype=bfloat16`.

The before-variants swap in the earlier implementations, kept below, while their step is
traced. Each variant gets its own state and compiled step, with the shardings of training.
After --warmup untimed steps each, the script runs --rounds rounds. In each round every
variant runs steps // rounds steps on the same prebuilt device batches. Alternating in short
blocks gives every variant the same share of whatever else the machine does, so the ratios
hold even where the absolute rates drift. The script prints the median block time per step,
the rate relative to `before` and XLA's FLOPs per step of each variant.
"""

import contextlib
import json
import os
import sys
import time

_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY_ROOT not in sys.path:
  sys.path.insert(0, _REPOSITORY_ROOT)

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_step as train_step_benchmark
from imputer import masking
from imputer import models
from imputer import sharding
from imputer import train

# The flags of train_step.py, which this script imports, serve here too: --config (default
# configs/phase1.py), --steps, --warmup, --rounds and --json_out.
_CONFIG = train_step_benchmark._CONFIG
_STEPS = train_step_benchmark._STEPS
_WARMUP = train_step_benchmark._WARMUP
_ROUNDS = train_step_benchmark._ROUNDS
_JSON_OUT = train_step_benchmark._JSON_OUT
_VARIANTS = flags.DEFINE_list('variants', ['before', 'conv_only', 'after', 'bfloat16'],
                              'Variants to time, from: before, conv_only, after, bfloat16.')

VARIANTS = ('before', 'conv_only', 'after', 'bfloat16')


class GroupedConv(nn.Module):
  """The local convolution before the pass: XLA's grouped convolution, one group per channel."""

  kernel_size: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    return nn.Conv(width, (self.kernel_size,), padding='SAME', feature_group_count=width,
                   dtype=self.dtype)(x)


def expand_by_products(layout, hidden_raw):
  """Map a hidden mask to features as before the pass: every feature through the matrices."""
  now = jnp.asarray(layout.feature_set.depends_now.T, jnp.float32)
  prev = jnp.asarray(layout.feature_set.depends_prev.T, jnp.float32)
  raw = hidden_raw.astype(jnp.float32)
  raw_prev = jnp.pad(raw[:, :-1], ((0, 0), (1, 0), (0, 0)))
  return (raw @ now + raw_prev @ prev) > 0


@contextlib.contextmanager
def earlier_code(variant: str):
  """Swap in the implementations that `variant` measures, and restore the current ones."""
  conv, expand = models.DepthwiseConv1D, masking.expand_to_features
  if variant == 'before':
    models.DepthwiseConv1D, masking.expand_to_features = GroupedConv, expand_by_products
  elif variant == 'conv_only':
    masking.expand_to_features = expand_by_products
  try:
    yield
  finally:
    models.DepthwiseConv1D, masking.expand_to_features = conv, expand


def variant_config(config, variant: str):
  if variant != 'bfloat16':
    return config
  changed = config.copy_and_resolve_references()
  changed.model.compute_dtype = 'bfloat16'
  return changed


def compile_variant(config, data, mesh, variant: str, batch):
  """Return (state, compiled step, FLOPs per step) of `variant`, traced under its code."""
  with earlier_code(variant):
    built = train.build_steps(variant_config(config, variant), data, mesh)
    compiled = built.train_step.lower(built.state, batch).compile()
  return built.state, compiled, train_step_benchmark.cost_figures(compiled)['flops']


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'--variants contains {unknown}; use names from {VARIANTS}.')
  config = _CONFIG.value
  data = train.prepare_data(config)
  mesh = sharding.make_mesh(config.mesh)
  per_block = max(_STEPS.value // _ROUNDS.value, 1)
  batches = [train_step_benchmark.assemble_batch(config, data, mesh, step)
             for step in range(max(per_block, _WARMUP.value))]

  states, steps, flops, compile_seconds = {}, {}, {}, {}
  for variant in _VARIANTS.value:
    start = time.perf_counter()
    states[variant], steps[variant], flops[variant] = compile_variant(
        config, data, mesh, variant, batches[0])
    compile_seconds[variant] = time.perf_counter() - start
    states[variant], _ = train_step_benchmark.time_prebuilt(
        steps[variant], states[variant], batches[:_WARMUP.value])

  blocks = {variant: [] for variant in _VARIANTS.value}
  load_before = os.getloadavg()[0]
  for _ in range(_ROUNDS.value):
    for variant in _VARIANTS.value:
      states[variant], seconds = train_step_benchmark.time_prebuilt(
          steps[variant], states[variant], batches[:per_block])
      blocks[variant].append(seconds / per_block)
  load_after = os.getloadavg()[0]

  reference = _VARIANTS.value[0]
  figures = {'config': _CONFIG.value.to_dict(), 'machine': train_step_benchmark.describe_machine(
      load_before, load_after), 'steps_per_block': per_block, 'rounds': _ROUNDS.value,
             'variants': {}}
  print(f'{"variant":<12}{"ms/step":>10}{"min-max ms":>16}{"steps/s":>9}'
        f'{"vs " + reference:>12}{"GFLOP/step":>12}{"compile s":>11}')
  for variant in _VARIANTS.value:
    median = float(np.median(blocks[variant]))
    ratio = float(np.median(blocks[reference])) / median
    figures['variants'][variant] = {
        'seconds_per_step_median': median, 'block_seconds_per_step': blocks[variant],
        'steps_per_second': 1.0 / median, 'speedup_over_first': ratio,
        'flops_per_step': flops[variant], 'compile_seconds': compile_seconds[variant]}
    spread = f'{1e3 * min(blocks[variant]):.1f}-{1e3 * max(blocks[variant]):.1f}'
    print(f'{variant:<12}{1e3 * median:>10.1f}{spread:>16}{1.0 / median:>9.2f}'
          f'{ratio:>11.2f}x{flops[variant] / 1e9:>12.3f}{compile_seconds[variant]:>11.1f}')
  print(f'load average {load_before:.2f} before the rounds, {load_after:.2f} after; '
        f'{per_block} steps per block, {_ROUNDS.value} rounds; jax {jax.__version__} on '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w', encoding='utf-8') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  app.run(main)
