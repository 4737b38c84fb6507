"""Train and evaluate a masked imputer.

  python launch.py --config=configs/phase1.py --workdir=runs/phase1

The config file is locked: `--config.FIELD=VALUE` overrides a field and a misspelt field is
an error. All work happens in `imputer.train.train_and_evaluate`, or for a config with a
`study` (ablations or a grid) in `imputer.study` and `imputer.side_by_side`; this file only
parses flags, starts the
distributed runtime when asked, and prints which process this is.
"""

import logging as pylogging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from imputer import side_by_side
from imputer import study
from imputer import study_results
from imputer import train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/phase1.py',
                                          'Path to a config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and the report.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() first, for a run over several hosts. On TPU VMs and '
    'SLURM it finds its peers by itself; elsewhere set JAX_COORDINATOR_ADDRESS, '
    'JAX_NUM_PROCESSES and JAX_PROCESS_ID.')


class _QuietOrbax(pylogging.Filter):
  """Drop orbax's per-save INFO lines, which would bury the progress lines."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info('Process %d of %d | local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  config = _CONFIG.value
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


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
