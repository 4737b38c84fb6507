"""Small recordings built in code, shared by several test files."""

import importlib

import numpy as np

from imputer import features
from imputer import recordings


def thm_spec():
  return recordings.GroupSpec('thm', features.CMI_THM_COLUMNS, features.CMI_THM_COLUMNS,
                              tuple(range(5)), 'cmi_thm')


def accel_spec():
  return recordings.single_sensor_group('acc', ('x', 'y', 'z'), 'accel')


def make_sequence(sequence_id, subject, length, seed, label=None, thm_offset=0.0):
  """Return a sequence with an accelerometer input and a THM target, all observed."""
  rng = np.random.default_rng(seed)
  acc = rng.normal(size=(length, 3))
  thm = 30.0 + thm_offset + rng.normal(size=(length, 5))
  raw = {'acc': acc, 'thm': thm}
  observed = {k: np.ones_like(v, bool) for k, v in raw.items()}
  return recordings.Sequence(sequence_id, subject, raw, observed, label)


def make_recording_set(subjects=6, per_subject=3, length=20, labels=None):
  sequences = []
  for s in range(subjects):
    for k in range(per_subject):
      label = None if labels is None else labels[(s + k) % len(labels)]
      sequences.append(make_sequence(f'S{s}_{k}', f'subject_{s}', length, 100 * s + k, label,
                                     thm_offset=float(s)))
  return recordings.RecordingSet('test data', (accel_spec(),), (thm_spec(),), sequences)


def tiny_config(phase: str = 'phase1', **overrides):
  """Return configs/`phase`.py shrunk to a few seconds of CPU, with dotted-field overrides."""
  config = importlib.import_module(f'configs.{phase}').get_config()
  config.data.synthetic.num_subjects = 6
  config.data.synthetic.sequences_per_subject = 8
  config.data.synthetic.min_length = 20
  config.data.synthetic.max_length = 40
  config.data.num_folds = 3
  config.data.window = 16
  config.data.train_stride = 8
  config.model.hidden_dim = 16
  config.model.encoder_layers = 1
  config.model.decoder_layers = 1
  config.model.num_heads = 2
  config.batch_size = 8
  config.num_epochs = 100
  config.eval_batch_size = 16
  config.optim.warmup_steps = 5
  config.log_every_steps = 10
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20
  config.max_checkpoints_to_keep = 5
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config
