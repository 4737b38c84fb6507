"""Small recordings built in code, shared by several test files."""

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
