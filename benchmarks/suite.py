"""Run every benchmark in fresh processes and print one summary of all figures.

  python benchmarks/suite.py --out=benchmark_suite.json [--steps=30] [--rows=500000]
      [--parts=throughput,scaling,preprocessing,impute]

Parts, each a separate process so that compile caches and peak memory do not carry over:

1. `train_step.py` for phases 0, 3, 4 and 6 at the default size, and phase 1 with a larger
   model: steps/s, windows/s, the input pipeline ratio and the achieved FLOP/s as a fraction
   of the float32 matmul peak measured in the same process.
2. Scaling of phase 1: the step rate and the compile time of the first step against the
   window length, the batch size and the model width, one field changed at a time. The
   window series runs on longer synthetic sequences (130 to 260 timesteps).
3. `preprocessing.py`: reading, engineering and scaling a CMI CSV of --rows rows against a
   plain polars read, with peak memory.
4. Impute mode on the same CSV, with a phase 1 model trained for --impute_train_steps steps:
   rows/s and peak memory.

The CSV and the impute workdir are kept under --scratch, so a second run reuses them.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OUT = flags.DEFINE_string('out', None, 'If set, write every figure to this JSON file.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per train-step measurement.',
                              lower_bound=1)
_ROWS = flags.DEFINE_integer('rows', 500_000, 'Rows of the CMI CSV for parts 3 and 4.',
                             lower_bound=1)
_SCRATCH = flags.DEFINE_string('scratch', os.path.join(tempfile.gettempdir(),
                                                       'imputer_benchmarks'),
                               'Folder for the generated CSV and the impute workdir.')
_IMPUTE_TRAIN_STEPS = flags.DEFINE_integer(
    'impute_train_steps', 20, 'Training steps of the model that part 4 imputes with; its '
    'speed does not depend on how well it is trained.', lower_bound=1)

_PARTS = flags.DEFINE_list('parts', ['throughput', 'scaling', 'preprocessing', 'impute'],
                           'Parts to run, in this order.')

PHASES = ('phase0', 'phase3', 'phase4', 'phase6')
LARGER_MODEL = ('--config.model.hidden_dim=128', '--config.model.encoder_layers=4',
                '--config.model.decoder_layers=4')
# Field, values, and overrides that every point of the series shares. The window series runs
# on synthetic sequences of 130 to 260 timesteps, so that a window of 128 fits in every one and
# the three points see the same recordings.
SCALING = {
    'window': ('data.window', (32, 64, 128), ('--config.data.synthetic.min_length=130',
                                             '--config.data.synthetic.max_length=260')),
    'batch_size': ('batch_size', (16, 32, 64), ()),
    'width': ('model.hidden_dim', (32, 64, 128), ()),
}

_IMPUTE_SCRIPT = '''
import json, resource, sys, time
from imputer import impute
start = time.perf_counter()
summary = impute.impute_file(sys.argv[1], sys.argv[2], sys.argv[3], uncertainty=True,
                             progress=False)
seconds = time.perf_counter() - start
print(json.dumps({'rows': summary['rows'], 'seconds': seconds,
                  'peak_memory_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def run(command: list[str]) -> str:
  """Run a command from the repository root and return its stdout; raise on failure."""
  env = dict(os.environ, PYTHONPATH=_ROOT)
  result = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-3000:]}')
  return result.stdout


def train_step_figures(config: str, *overrides: str) -> dict:
  """Run train_step.py for `config` with overrides and return its JSON figures."""
  with tempfile.NamedTemporaryFile(suffix='.json') as out:
    run([sys.executable, 'benchmarks/train_step.py', f'--config={config}', *overrides,
         f'--steps={_STEPS.value}', '--warmup=2', '--matmul_sizes=1024,2048',
         '--matmul_repeats=3', f'--json_out={out.name}'])
    with open(out.name, encoding='utf-8') as f:
      return json.load(f)


def summarise_train_step(figures: dict) -> dict:
  """Keep the figures of the table. The real path is the one the config trains with."""
  real = figures['real_path']
  return {
      'steps_per_second': figures['prebuilt_batches']['steps_per_second'],
      'windows_per_second': figures['prebuilt_batches']['windows_per_second'],
      'real_path': real,
      'steps_per_second_real_path': figures[real]['steps_per_second'],
      'input_pipeline_ratio': figures['input_pipeline_ratio'][real],
      'input_pipeline_ratio_other_path': figures['input_pipeline_ratio'][
          'with_prefetch' if real == 'with_batch_assembly' else 'with_batch_assembly'],
      'gflop_per_step': figures['cost']['flops'] / 1e9,
      'fraction_of_peak': figures['prebuilt_batches']['fraction_of_peak'],
      'matmul_peak_gflops': figures['matmul_peak']['flops_per_second'] / 1e9,
      'compile_seconds': figures['init_and_compile_seconds'],
      'parameters': figures['config']['parameters'],
  }


def throughput_part() -> dict:
  results = {}
  for phase in PHASES:
    print(f'train step: {phase}', flush=True)
    results[phase] = summarise_train_step(train_step_figures(f'configs/{phase}.py'))
  print('train step: phase1, larger model', flush=True)
  results['phase1_larger'] = summarise_train_step(
      train_step_figures('configs/phase1.py', *LARGER_MODEL))
  return results


def scaling_part() -> dict:
  results = {}
  for name, (field, values, shared) in SCALING.items():
    for value in values:
      print(f'scaling: {field}={value}', flush=True)
      figures = train_step_figures('configs/phase1.py', f'--config.{field}={value}', *shared)
      results[f'{name}={value}'] = summarise_train_step(figures)
  return results


def preprocessing_part(csv: str) -> dict:
  print('preprocessing', flush=True)
  with tempfile.NamedTemporaryFile(suffix='.json') as out:
    run([sys.executable, 'benchmarks/preprocessing.py', f'--rows={_ROWS.value}', f'--csv={csv}',
         f'--json_out={out.name}'])
    with open(out.name, encoding='utf-8') as f:
      return json.load(f)


def impute_part(csv: str) -> dict:
  workdir = os.path.join(_SCRATCH.value, f'phase1_{_IMPUTE_TRAIN_STEPS.value}_steps')
  if not os.path.exists(os.path.join(workdir, 'eval_report.json')):
    print('impute: training the model', flush=True)
    run([sys.executable, 'launch.py', '--config=configs/phase1.py', f'--workdir={workdir}',
         '--config.model.variance_head=True',
         f'--config.num_train_steps={_IMPUTE_TRAIN_STEPS.value}'])
  print('impute', flush=True)
  output = os.path.join(_SCRATCH.value, 'imputed.parquet')
  figures = json.loads(run([sys.executable, '-c', _IMPUTE_SCRIPT, workdir, csv,
                            output]).strip().splitlines()[-1])
  os.remove(output)
  return figures


def format_summary(results: dict) -> str:
  lines = ['=' * 96, 'Benchmark suite', '',
           f"{'train step':<24}{'params':>10}{'GFLOP/step':>11}{'steps/s':>9}{'windows/s':>10}"
           f"{'of peak':>9}{'pipeline':>10}{'other':>8}{'compile s':>10}"]
  for part in ('throughput', 'scaling'):
    for name, entry in results.get(part, {}).items():
      lines.append(
          f"{name:<24}{entry['parameters']:>10,}{entry['gflop_per_step']:>11.3f}"
          f"{entry['steps_per_second']:>9.2f}{entry['windows_per_second']:>10.1f}"
          f"{entry['fraction_of_peak']:>9.1%}{entry['input_pipeline_ratio']:>10.3f}"
          f"{entry['input_pipeline_ratio_other_path']:>8.3f}"
          f"{entry['compile_seconds']:>10.1f}")
  if 'preprocessing' in results:
    prep = results['preprocessing']
    lines += ['', f"preprocessing of {prep['polars']['rows']:,} rows: polars read "
              f"{prep['polars']['seconds']:.2f} s, imputer path {prep['imputer']['seconds']:.2f} "
              f"s (ratio {prep['time_ratio']:.2f}), peak memory "
              f"{prep['imputer']['peak_memory_bytes'] / 1e9:.2f} GB"]
  if 'impute' in results:
    imp = results['impute']
    lines.append(f"impute mode on {imp['rows']:,} rows: {imp['seconds']:.1f} s, "
                 f"{imp['rows'] / imp['seconds']:,.0f} rows/s, peak memory "
                 f"{imp['peak_memory_bytes'] / 1e9:.2f} GB")
  lines.append('=' * 96)
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  os.makedirs(_SCRATCH.value, exist_ok=True)
  csv = os.path.join(_SCRATCH.value, f'cmi_{_ROWS.value}.csv')
  start = time.perf_counter()
  parts = {'throughput': throughput_part, 'scaling': scaling_part,
           'preprocessing': lambda: preprocessing_part(csv), 'impute': lambda: impute_part(csv)}
  unknown = sorted(set(_PARTS.value) - set(parts))
  if unknown:
    raise app.UsageError(f'--parts contains {unknown}; use names from {sorted(parts)}.')
  results = {'load_average_before': os.getloadavg()[0]}
  for name in _PARTS.value:
    results[name] = parts[name]()
  results['load_average_after'] = os.getloadavg()[0]
  results['seconds'] = time.perf_counter() - start
  print(format_summary(results))
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
