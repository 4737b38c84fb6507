"""Time the compiled training step and compare its FLOP rate with a float32 matmul peak.

  python benchmarks/train_step.py --config=configs/phase1.py --steps=30 --warmup=3

The data, model, optimizer and the step compiled over the `data` mesh are built with the
same functions and shardings as `imputer.train.train_and_evaluate`. The FLOPs of one step
come from XLA's cost analysis of the compiled program. The peak is the best float32 matmul
rate measured on the first device of this machine. Both use JAX's default matmul precision.
"""

import json
import os
import sys
import time

# `python benchmarks/train_step.py` puts only benchmarks/ on sys.path, but the config files
# import `configs` and this script imports `imputer`, both from the repository root.
_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY_ROOT not in sys.path:
  sys.path.insert(0, _REPOSITORY_ROOT)

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from imputer import prefetch
from imputer import sharding
from imputer import train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/phase1.py',
                                          'Path to a config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed training steps in each measurement.',
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer(
    'warmup', 3, 'Untimed training steps run after compilation and before the first '
    'measurement.', lower_bound=0)
_ROUNDS = flags.DEFINE_integer(
    'rounds', 5, 'Alternating blocks of the three measurements; each block runs '
    'steps // rounds steps.', lower_bound=1)
_MATMUL_SIZES = flags.DEFINE_list(
    'matmul_sizes', ['1024', '2048', '4096'],
    'Sizes n of the float32 (n x n) @ (n x n) matmuls that measure the peak FLOP rate.')
_MATMUL_REPEATS = flags.DEFINE_integer(
    'matmul_repeats', 5, 'Timed matmuls per size after one untimed call; the fastest counts.',
    lower_bound=1)
_JSON_OUT = flags.DEFINE_string('json_out', None, 'If set, also write the figures to this '
                                'JSON file.')


MEASUREMENTS = (('prebuilt_batches', 'device batches prebuilt'),
                ('with_batch_assembly', 'built on the loop thread'),
                ('with_prefetch', 'built ahead (prefetch)'))


def _parse_matmul_sizes(values) -> tuple[int, ...]:
  sizes = []
  for value in values:
    try:
      size = int(value)
    except ValueError:
      size = 0
    if size < 1:
      raise ValueError(f'--matmul_sizes contains the invalid entry {value!r}. Give positive '
                       'integers separated by commas, for example --matmul_sizes=1024,2048.')
    sizes.append(size)
  if not sizes:
    raise ValueError('--matmul_sizes is empty. Give at least one size, for example '
                     '--matmul_sizes=1024.')
  return tuple(sizes)


def compile_train_step(config, data: train.RunData, mesh):
  """Build the initial state and compile the train step with `train.build_steps`.

  Returns (state, compiled step). The step takes (state, batch), donates the state and
  returns (new state, metrics), with the state replicated and the batch split along `data`.
  """
  built = train.build_steps(config, data, mesh)
  batch = assemble_batch(config, data, mesh, 0)
  return built.state, built.train_step.lower(built.state, batch).compile()


def assemble_batch(config, data: train.RunData, mesh, step: int):
  """Return the device batch of `step`, built on the host the way the training loop does."""
  return next(train.train_batches(config, data, mesh, step, step + 1))


def cost_figures(compiled) -> dict[str, float]:
  """Return XLA's estimated FLOPs and bytes accessed of one run of a compiled program.

  The figures are for the program that one device runs. With the batch split over N devices,
  that program does about 1/N of the batch work. jax 0.10.2 returns a dict from
  `cost_analysis()`. Its docstring leaves the structure open, so a list of dicts is read by
  its first entry.
  """
  try:
    analysis = compiled.cost_analysis()
  except NotImplementedError as error:
    raise RuntimeError(
        f'XLA cost analysis is not available on the {jax.default_backend()} backend '
        f'({error}), so the achieved FLOP rate cannot be computed.') from error
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  if not analysis or 'flops' not in analysis:
    raise RuntimeError(
        f'XLA cost analysis returned no FLOP count on the {jax.default_backend()} backend '
        f'(got {analysis!r}), so the achieved FLOP rate cannot be computed.')
  return {'flops': float(analysis['flops']),
          'bytes_accessed': float(analysis.get('bytes accessed', float('nan')))}


def time_prebuilt(compiled, state, batches):
  """Run the step on device batches built beforehand and return (state, seconds).

  The steps are dispatched back to back and the clock stops once the last outputs are ready,
  so only the device work and the dispatch are timed.
  """
  jax.block_until_ready(state)
  start = time.perf_counter()
  metrics = None
  for batch in batches:
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def time_with_assembly(compiled, state, config, data, mesh, first_step: int, count: int,
                       depth: int):
  """Run `count` steps with batches built as in training, and return (state, seconds).

  Batches come from `train.train_batches` through `prefetch.prefetch` with `depth` (0: each
  batch is built on this thread when its step starts). This is the work of the training loop
  without its metric fetches, logging, evaluation and checkpoints.
  """
  jax.block_until_ready(state)
  start = time.perf_counter()
  metrics = None
  batches = prefetch.prefetch(
      train.train_batches(config, data, mesh, first_step, first_step + count), depth)
  for batch in batches:
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def prefetch_depth(config) -> int:
  """Return the depth of the prefetch measurement: the config's, or 2 where it is off."""
  return config.prefetch_depth or 2


def interleaved_timings(compiled, state, config, data, mesh, warmup: int, steps: int,
                        rounds: int):
  """Time the three ways of feeding the step in `rounds` alternating blocks.

  Each round runs steps // rounds steps with prebuilt batches, then as many with batches built
  on the loop thread, then as many through the prefetch thread. Alternating in short blocks
  exposes the three ways to the same load on a shared machine, so that their ratio is not
  thrown off by another process starting or stopping between two long measurements. Returns
  (state, {measurement: estimated seconds for `steps` steps}), from the median block of each.
  """
  per_block = max(steps // rounds, 1)
  batches = [assemble_batch(config, data, mesh, step) for step in range(warmup)]
  state, _ = time_prebuilt(compiled, state, batches)
  step, blocks = warmup, {name: [] for name, _ in MEASUREMENTS}
  for _ in range(rounds):
    batches = [assemble_batch(config, data, mesh, s) for s in range(step, step + per_block)]
    state, seconds = time_prebuilt(compiled, state, batches)
    blocks['prebuilt_batches'].append(seconds)
    step += per_block
    for name, depth in (('with_batch_assembly', 0),
                        ('with_prefetch', prefetch_depth(config))):
      state, seconds = time_with_assembly(compiled, state, config, data, mesh, step, per_block,
                                          depth)
      blocks[name].append(seconds)
      step += per_block
  return state, {name: float(np.median(times)) * steps / per_block
                 for name, times in blocks.items()}


def measure_matmul_peak(sizes, repeats: int) -> list[dict]:
  """Time float32 (n x n) @ (n x n) matmuls on the default device, 2 n^3 FLOPs each.

  Returns one entry per size with its fastest time out of `repeats` and the FLOP rate of it.
  """
  matmul = jax.jit(jnp.matmul)
  results = []
  for size in sizes:
    left_key, right_key = jax.random.split(jax.random.PRNGKey(size))
    left = jax.random.normal(left_key, (size, size), jnp.float32)
    right = jax.random.normal(right_key, (size, size), jnp.float32)
    jax.block_until_ready(matmul(left, right))
    best = float('inf')
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(matmul(left, right))
      best = min(best, time.perf_counter() - start)
    results.append({'n': size, 'seconds': best, 'flops_per_second': 2.0 * size**3 / best})
    logging.info('matmul %d: %.4f s, %.3g FLOP/s', size, best, 2.0 * size**3 / best)
  return results


def describe_machine(load_before: float, load_after: float) -> dict:
  """Describe the devices and the host, with its 1-minute load average before and after."""
  device = jax.devices()[0]
  return {
      'jax_version': jax.__version__,
      'backend': jax.default_backend(),
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'device_kind': device.device_kind,
      'host_cpu_count': os.cpu_count(),
      'load_average_before': load_before,
      'load_average_after': load_after,
  }


def describe_config(config, data: train.RunData, state) -> dict:
  return {
      'loss': config.loss.kind,
      'decoder': config.model.decoder,
      'decoder_type': config.model.decoder_type,
      'hidden_dim': config.model.hidden_dim,
      'encoder_layers': config.model.encoder_layers,
      'decoder_layers': config.model.decoder_layers,
      'interpolation_prior': config.model.interpolation_prior,
      'window': config.data.window,
      'batch_size': config.batch_size,
      'data_source': data.recording_set.source,
      'train_windows': len(data.train),
      'target_groups': [f'{l.name} ({l.num_features} features)' for l in data.target_layouts],
      'parameters': int(sum(x.size for x in jax.tree.leaves(state.params))),
  }


def throughput(seconds: float, steps: int, config, flops_per_step: float) -> dict:
  """Return the rates of `steps` steps that took `seconds`, with FLOP/s per device."""
  steps_per_second = steps / seconds
  windows_per_second = steps_per_second * config.batch_size
  return {
      'seconds': seconds,
      'steps_per_second': steps_per_second,
      'windows_per_second': windows_per_second,
      'timesteps_per_second': windows_per_second * config.data.window,
      'flops_per_second_per_device': flops_per_step * steps_per_second,
  }


def format_summary(figures: dict) -> str:
  """Return the human-readable summary block of the figures."""
  machine, config, cost = figures['machine'], figures['config'], figures['cost']
  peak = figures['matmul_peak']
  lines = [
      '=' * 72,
      'Train step benchmark',
      f"jax {machine['jax_version']} | backend {machine['backend']} | "
      f"{machine['device_count']} x {machine['device_kind']} | "
      f"{machine['process_count']} process(es) | host CPUs {machine['host_cpu_count']} | "
      f"load average {machine['load_average_before']:.2f} before, "
      f"{machine['load_average_after']:.2f} after",
      f"config: loss {config['loss']} | decoder {config['decoder']} "
      f"({config['decoder_type']}) | hidden_dim {config['hidden_dim']} | encoder_layers "
      f"{config['encoder_layers']} | decoder_layers {config['decoder_layers']}",
      f"        interpolation_prior {config['interpolation_prior']} | window "
      f"{config['window']} | batch_size {config['batch_size']} | "
      f"parameters {config['parameters']:,}",
      f"data: {config['data_source']} | {config['train_windows']} train windows | "
      f"valid (non-padding) timesteps {figures['valid_fraction']:.1%}",
      f"state init and compile {figures['init_and_compile_seconds']:.1f} s | "
      f"{figures['warmup']} warmup steps | "
      f"{figures['steps']} timed steps per measurement, in {figures['rounds']} alternating "
      "blocks (median block)",
      f"XLA cost per step and device: {cost['flops'] / 1e9:.3f} GFLOP, "
      f"{cost['bytes_accessed'] / 1e6:.1f} MB accessed",
      '',
      f"{'measurement':<28}{'steps/s':>9}{'windows/s':>11}{'timesteps/s':>13}"
      f"{'GFLOP/s':>9}{'of peak':>9}",
  ]
  for name, label in MEASUREMENTS:
    rates = figures[name]
    lines.append(
        f"{label:<28}{rates['steps_per_second']:>9.2f}{rates['windows_per_second']:>11.1f}"
        f"{rates['timesteps_per_second']:>13.0f}"
        f"{rates['flops_per_second_per_device'] / 1e9:>9.2f}{rates['fraction_of_peak']:>9.1%}")
  ratios = figures['input_pipeline_ratio']
  lines.append(f"input pipeline ratio (steps/s over prebuilt): "
               f"{ratios['with_batch_assembly']:.3f} without prefetch, "
               f"{ratios['with_prefetch']:.3f} with prefetch depth {figures['prefetch_depth']}")
  lines.append('')
  sizes = ', '.join(f"n={matmul['n']}: {matmul['flops_per_second'] / 1e9:.1f}"
                    for matmul in peak['matmuls'])
  lines.append(f"float32 matmul GFLOP/s on one device: {sizes}")
  lines.append(f"peak (best of these): {peak['flops_per_second'] / 1e9:.1f} GFLOP/s")
  lines.append('=' * 72)
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  matmul_sizes = _parse_matmul_sizes(_MATMUL_SIZES.value)
  steps, warmup = _STEPS.value, _WARMUP.value
  # A load average above the CPU count before the run means other processes shared the cores.
  # The figure after the run also counts this benchmark's own threads.
  load_before = os.getloadavg()[0]

  data = train.prepare_data(config)
  mesh = sharding.make_mesh(config.mesh)
  start = time.perf_counter()
  state, compiled = compile_train_step(config, data, mesh)
  init_and_compile_seconds = time.perf_counter() - start
  cost = cost_figures(compiled)
  logging.info('State built and step compiled in %.1f s, %.3g FLOPs per step and device.',
               init_and_compile_seconds, cost['flops'])

  state, seconds = interleaved_timings(compiled, state, config, data, mesh, warmup, steps,
                                       _ROUNDS.value)
  prebuilt_seconds, assembly_seconds, prefetch_seconds = (
      seconds[name] for name, _ in MEASUREMENTS)

  matmuls = measure_matmul_peak(matmul_sizes, _MATMUL_REPEATS.value)
  peak = max(matmul['flops_per_second'] for matmul in matmuls)
  figures = {
      'machine': describe_machine(load_before, os.getloadavg()[0]),
      'config': describe_config(config, data, state),
      'valid_fraction': float(data.train.batch['valid'].mean()),
      'init_and_compile_seconds': init_and_compile_seconds,
      'warmup': warmup,
      'steps': steps,
      'rounds': _ROUNDS.value,
      'cost': cost,
      'prebuilt_batches': throughput(prebuilt_seconds, steps, config, cost['flops']),
      'with_batch_assembly': throughput(assembly_seconds, steps, config, cost['flops']),
      'with_prefetch': throughput(prefetch_seconds, steps, config, cost['flops']),
      'prefetch_depth': prefetch_depth(config),
      # The way the config's training loop feeds the step.
      'real_path': 'with_prefetch' if config.prefetch_depth else 'with_batch_assembly',
      'matmul_peak': {'flops_per_second': peak, 'matmuls': matmuls},
  }
  for name, _ in MEASUREMENTS:
    figures[name]['fraction_of_peak'] = figures[name]['flops_per_second_per_device'] / peak
  # The input pipeline's efficiency: the real data path's rate over the rate with batches
  # already on the device (1.0 means the host never delays the device).
  figures['input_pipeline_ratio'] = {
      name: figures[name]['steps_per_second'] / figures['prebuilt_batches']['steps_per_second']
      for name in ('with_batch_assembly', 'with_prefetch')}

  print(format_summary(figures))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w', encoding='utf-8') as f:
      json.dump(figures, f, indent=2)
    logging.info('Wrote %s', _JSON_OUT.value)


if __name__ == '__main__':
  app.run(main)
