"""Preset for smartwatch sensor streams: gyroscope and PPG imputed from the accelerometer.

  python launch.py --config=configs/bfrb_watch.py --config.data.path=FOLDER --workdir=runs/watch
  python launch.py --config=configs/bfrb_watch.py:phase4 --config.data.path=FOLDER --workdir=runs/w4

FOLDER contains one sub-folder per participant (exp-1 ... exp-10 in the public recordings of
Searle et al., MobileHCI 2021), each with accLabeled.csv, gyrLabeled.csv, ppgLabeled.csv and
hrmLabeled.csv. Participants are the subjects, so whole participants are held out.

The text after the colon names the phase config that the preset starts from (phase0 to
phase7; phase1, the shared decoder with conf_mae, when omitted), and optionally the platform
after another colon (configs/bfrb_watch.py:phase4:gpu; see configs/platforms.py). With phase7
it is a study. The preset changes only the data and the number of epochs, so every phase
trains on the watch with its own settings.
"""

import importlib

import ml_collections

from configs import platforms

PHASES = ('phase0', 'phase1', 'phase2', 'phase3', 'phase4', 'phase5', 'phase6', 'phase7')


def stream(file, columns, role, features='raw', missing_values='', max_gap_ms=150.0):
  return ml_collections.ConfigDict({
      'file': file, 'columns': columns, 'role': role, 'features': features,
      'missing_values': missing_values, 'max_gap_ms': max_gap_ms})


def parse_argument(argument: str) -> tuple[str, str]:
  """Split 'phase4', 'gpu', 'phase4:gpu' or 'gpu:phase4' into (phase, platform)."""
  phase, platform = 'phase1', ''
  for part in filter(None, (argument or '').replace(',', ':').split(':')):
    if part in PHASES:
      phase = part
    elif part in platforms.PLATFORMS:
      platform = part
    else:
      raise ValueError(
          f'configs/bfrb_watch.py:{argument}: {part!r} is neither a phase ({", ".join(PHASES)}) '
          f'nor a platform ({", ".join(platforms.PLATFORMS)}); for example '
          '--config=configs/bfrb_watch.py:phase4:gpu.')
  return phase, platform


def get_config(argument: str = 'phase1'):
  phase, platform = parse_argument(argument)
  config = importlib.import_module(f'configs.{phase}').get_config(platform)
  data = config.data
  # The watch samples about every 100 ms; a grid point takes a sample at most 150 ms away.
  data.stream_rate_hz = 10.0
  data.streams = ml_collections.ConfigDict({
      'acc': stream('accLabeled.csv', 'x,y,z', 'input', features='accel'),
      # Heart rate arrives once a second and 0 means no reading; it is an input because it
      # carries the pulse that the PPG target follows.
      'hr': stream('hrmLabeled.csv', 'hrv', 'input', missing_values='0', max_gap_ms=1500.0),
      'gyro': stream('gyrLabeled.csv', 'x,y,z', 'target'),
      'ppg': stream('ppgLabeled.csv', 'ppg', 'target'),
      # The annotated behaviour per sample (0 for none): not a model input, but the labels of
      # the downstream check (--mode=downstream).
      'behaviour': stream('accLabeled.csv', 'label', 'label'),
  })
  data.window = 64  # 6.4 s at 10 Hz.
  data.train_stride = 32
  config.num_epochs = 16
  return config
