"""Time reading, engineering and scaling a CMI-schema CSV against a plain polars read.

  python benchmarks/preprocessing.py --rows=500000 --csv=/tmp/cmi_500k.csv

When --csv does not exist, a synthetic CMI-schema table of --rows rows is generated and
written there first (kept for later runs). Each measurement runs in a fresh Python process,
so its peak resident memory is its own:

* `polars`: `polars.read_csv` of the file with default settings, the baseline;
* `imputer`: the path training takes up to windows, `cmi.load_cmi` (read, check, group into
  sequences, observed masks), `windows.engineer_sequences` (the engineered channels of every
  sequence) and `windows.fit_scalers` with the scaling of every sequence.

The ratio is the imputer path's time over the polars read's time.
"""

import json
import os
import resource
import subprocess
import sys
import time

_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY_ROOT not in sys.path:
  sys.path.insert(0, _REPOSITORY_ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_ROWS = flags.DEFINE_integer('rows', 500_000, 'Rows of the generated table.', lower_bound=1)
_CSV = flags.DEFINE_string('csv', '/tmp/imputer_benchmark_cmi.csv',
                           'The CMI-schema CSV to read; generated when it does not exist.')
_STAGE = flags.DEFINE_enum('stage', None, ['polars', 'imputer'],
                           'Internal: run one measurement in this process and print JSON.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'If set, also write the figures here.')

AVERAGE_SEQUENCE_ROWS = 80  # The generator draws lengths between 40 and 120 rows.
SUBJECTS = 50


def generate_table(path: str, rows: int) -> None:
  """Write a synthetic CMI-schema table of exactly `rows` rows to `path`."""
  from imputer import synthetic  # pylint: disable=import-outside-toplevel
  sequences = -(-rows // AVERAGE_SEQUENCE_ROWS) + SUBJECTS
  per_subject = -(-sequences // SUBJECTS)
  frame = synthetic.generate_cmi_frame(num_subjects=SUBJECTS,
                                       sequences_per_subject=per_subject, min_length=40,
                                       max_length=120, imu_only_fraction=0.4, seed=0)
  if frame.height < rows:
    raise RuntimeError(f'the generator made {frame.height} rows, fewer than --rows={rows}.')
  frame.head(rows).write_csv(path)


def peak_memory_bytes() -> int:
  """Return this process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_polars(path: str) -> dict:
  import polars as pl  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  frame = pl.read_csv(path)
  seconds = time.perf_counter() - start
  return {'rows': frame.height, 'seconds': seconds, 'peak_memory_bytes': peak_memory_bytes()}


def measure_imputer(path: str) -> dict:
  """Time each stage of reading, engineering and scaling, as training runs them."""
  # pylint: disable=import-outside-toplevel
  from imputer import cmi
  from imputer import layout as layout_lib
  from imputer import windows as windows_lib
  stages = {}
  start = time.perf_counter()
  recording_set = cmi.load_cmi(path)
  stages['read_and_group'] = time.perf_counter() - start
  layouts = layout_lib.build_layouts(recording_set.groups)
  start = time.perf_counter()
  engineered = windows_lib.engineer_sequences(recording_set.sequences, layouts)
  stages['engineer'] = time.perf_counter() - start
  start = time.perf_counter()
  scalers = windows_lib.fit_scalers(engineered, layouts)
  for sequence in engineered:
    for layout in layouts:
      scalers[layout.name].transform(sequence.values[layout.name])
  stages['fit_and_scale'] = time.perf_counter() - start
  rows = sum(sequence.length for sequence in recording_set.sequences)
  return {'rows': rows, 'sequences': len(recording_set.sequences),
          'seconds': sum(stages.values()), 'stages': stages,
          'peak_memory_bytes': peak_memory_bytes()}


def run_stage(stage: str, path: str) -> dict:
  """Run one measurement in a fresh process and return its figures."""
  command = [sys.executable, os.path.abspath(__file__), f'--stage={stage}', f'--csv={path}']
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f'the {stage} measurement failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def format_summary(figures: dict) -> str:
  polars_figures, imputer_figures = figures['polars'], figures['imputer']
  lines = [
      '=' * 72, 'Preprocessing benchmark',
      f"file: {figures['csv']} | {figures['file_bytes'] / 1e6:.1f} MB | "
      f"{polars_figures['rows']:,} rows | {imputer_figures['sequences']:,} sequences",
      f"{'measurement':<34}{'seconds':>9}{'rows/s':>12}{'peak memory':>14}"]
  for name, label in (('polars', 'polars.read_csv'),
                      ('imputer', 'read, engineer and scale')):
    entry = figures[name]
    lines.append(f"{label:<34}{entry['seconds']:>9.2f}{entry['rows'] / entry['seconds']:>12,.0f}"
                 f"{entry['peak_memory_bytes'] / 1e9:>11.2f} GB")
  for stage, seconds in imputer_figures['stages'].items():
    lines.append(f"  {stage:<32}{seconds:>9.2f}")
  lines.append(f"time ratio (imputer path / polars read): {figures['time_ratio']:.2f}")
  lines.append('=' * 72)
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  path = _CSV.value
  if _STAGE.value:
    measure = measure_polars if _STAGE.value == 'polars' else measure_imputer
    print(json.dumps(measure(path)))
    return
  if not os.path.exists(path):
    print(f'Generating {_ROWS.value:,} rows into {path} ...', flush=True)
    generate_table(path, _ROWS.value)
  figures = {'csv': path, 'file_bytes': os.path.getsize(path),
             'polars': run_stage('polars', path), 'imputer': run_stage('imputer', path)}
  figures['time_ratio'] = figures['imputer']['seconds'] / figures['polars']['seconds']
  print(format_summary(figures))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w', encoding='utf-8') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  app.run(main)
