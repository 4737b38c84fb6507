"""Train and evaluate a masked imputer, or use a trained one.

  python launch.py --config=configs/phase1.py --workdir=runs/phase1
  python launch.py --mode=impute --workdir=runs/phase1 --input=test.csv --output=filled.csv
  python launch.py --mode=report --workdir=runs/phase1
  python launch.py --mode=downstream --workdir=runs/phase1

The modes other than train read the config that the workdir holds; --config is not used.

The config file is locked: `--config.FIELD=VALUE` overrides a field and a misspelt field is
an error. All work happens in `imputer.train.train_and_evaluate`, or for a config with a
`study` (ablations or a grid) in `imputer.study` and `imputer.side_by_side`; this file only
parses flags, starts the
distributed runtime when asked, and prints which process this is.
"""

import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from imputer import downstream
from imputer import impute
from imputer import preemption
from imputer import run_config
from imputer import side_by_side
from imputer import study
from imputer import study_results
from imputer import train
from imputer import visual_report

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/phase1.py',
                                          'Path to a config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and the report.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() first, for a run over several processes or hosts. On '
    'TPU VMs, SLURM, Open MPI and Kubernetes it finds its peers by itself; elsewhere give '
    '--coordinator_address, --num_processes and --process_id.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --distributed: host:port of process 0, which every '
    'process connects to, for example 10.0.0.2:8476.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'With --distributed: how many processes take part.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'With --distributed: this process, 0 to num_processes - 1.')

_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'impute', 'report', 'downstream'],
    'train: train and evaluate (or run a study). impute: fill the THM/ToF values that --input '
    'lacks and write --output. report: PNG figures and an HTML page for chosen sequences. '
    'downstream: gesture classifiers on IMU only, IMU plus imputed and IMU plus real THM/ToF.')
_INPUT = flags.DEFINE_string('input', None, 'impute: the CMI-schema .csv or .parquet to fill.')
_OUTPUT = flags.DEFINE_string('output', None, 'impute: the .csv or .parquet file to write.')
_UNCERTAINTY = flags.DEFINE_bool(
    'uncertainty', False, 'impute: add a <column>_std column per target column (needs a run '
    'trained with a conf_ loss).')
_CHUNK_ROWS = flags.DEFINE_integer(
    'chunk_rows', 50_000, 'impute: rows read at a time; chunks end at sequence boundaries.')
_STRIDE = flags.DEFINE_integer(
    'stride', 0, 'impute, report and downstream: timesteps between window starts; 0 means '
    'half a window.')
_SEQUENCES = flags.DEFINE_list(
    'sequences', [], 'report: sequence_ids to draw; default, the first test sequences.')


class _QuietOrbax(pylogging.Filter):
  """Drop orbax's per-save INFO lines, which would bury the progress lines."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info('Process %d of %d | local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  if _MODE.value != 'train':
    try:
      _use_trained()
    except ValueError as error:
      # A bad file or workdir: the message names it and the fix, so no traceback is printed.
      logging.error('%s', error)
      sys.exit(1)
    return
  config = _CONFIG.value
  run_config.resolve_platform(config, jax.device_count(), jax.default_backend())
  try:
    with run_config.matmul_precision(config):
      _train(config)
  except preemption.Preempted as stopped:
    # A checkpoint of the step is saved, and the exit status shows a scheduler it was a signal.
    logging.warning('%s', stopped)
    sys.exit(stopped.exit_status)


def _train(config) -> None:
  """Train the single run or the study that `config` describes."""
  if config.study.ablations or config.study.grid:
    # The runs of a study compile many identical programs (every evaluation of variants that
    # share a model), so their compiled forms are kept on disk and reused.
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update('jax_compilation_cache_dir',
                        os.path.join(os.path.abspath(_WORKDIR.value), 'xla_cache'))
      logging.info('XLA compilation cache: %s', jax.config.jax_compilation_cache_dir)
    if config.study.mode == 'sequential':
      variants = study.run_sequential(config, _WORKDIR.value, train.train_and_evaluate)
    else:
      variants = side_by_side.run(config, _WORKDIR.value)
    summary = study_results.write_outputs(_WORKDIR.value, config, variants)
    logging.info('Study finished: best variant %s (validation R² %.4f), written to %s',
                 summary['best'], summary['score'], summary['best_config'])
  else:
    train.train_and_evaluate(config, _WORKDIR.value)


def _use_trained() -> None:
  """Run impute, report or downstream mode on the trained run in --workdir."""
  stride = _STRIDE.value or None
  if _MODE.value == 'impute':
    if not _INPUT.value or not _OUTPUT.value:
      raise app.UsageError('--mode=impute needs --input=FILE and --output=FILE.')
    impute.impute_file(_WORKDIR.value, _INPUT.value, _OUTPUT.value, _UNCERTAINTY.value,
                       _CHUNK_ROWS.value, stride)
  elif _MODE.value == 'report':
    path = visual_report.write_visual_report(_WORKDIR.value, _SEQUENCES.value, stride)
    logging.info('Wrote %s', path)
  else:
    path = downstream.run(_WORKDIR.value, stride)
    logging.info('Wrote %s', path)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
