"""Engineered sequences cut into fixed-length, scaled windows: the arrays the model trains on.

A window keeps three distinct states per value: observed (`observed` True), missing in the
recording (`observed` False inside the sequence) and padding (`valid` False: past the end of a
short sequence or the last window of a long one). Values are zero wherever unobserved, so no
NaN ever reaches a batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from imputer import features
from imputer import scaling


@dataclasses.dataclass
class FeatureSequence:
  """One sequence after feature engineering: per group (T, F) values (NaN if unobserved)."""

  sequence_id: str
  subject: str
  values: dict[str, np.ndarray]
  observed: dict[str, np.ndarray]

  @property
  def length(self) -> int:
    return next(iter(self.values.values())).shape[0]


@dataclasses.dataclass
class Windows:
  """Stacked windows: `batch` is the model's pytree and `index` locates each window.

  batch = {'valid': (N, W) bool, 'values': {group: (N, W, F) float32},
           'observed': {group: (N, W, F) bool}}
  index: (N, 3) int64 rows of (sequence position in `sequences`, start timestep, length).
  """

  batch: dict
  index: np.ndarray

  def __len__(self) -> int:
    return self.index.shape[0]

  def take(self, rows) -> dict:
    """Return the batch pytree restricted to `rows`."""
    return {
        'valid': self.batch['valid'][rows],
        'values': {g: v[rows] for g, v in self.batch['values'].items()},
        'observed': {g: m[rows] for g, m in self.batch['observed'].items()},
    }


def engineer_sequences(sequences, layouts) -> list[FeatureSequence]:
  """Compute every group's features per sequence, never across a sequence boundary."""
  out = []
  for seq in sequences:
    values, observed = {}, {}
    for layout in layouts:
      context = f'sequence {seq.sequence_id!r}, group {layout.name!r}'
      values[layout.name], observed[layout.name] = features.engineer(
          layout.feature_set, seq.raw[layout.name], seq.observed[layout.name], context)
    out.append(FeatureSequence(seq.sequence_id, seq.subject, values, observed))
  return out


def fit_scalers(feature_sequences, layouts) -> dict[str, scaling.GroupScaler]:
  return {
      layout.name: scaling.fit_group([fs.values[layout.name] for fs in feature_sequences],
                                     [fs.observed[layout.name] for fs in feature_sequences])
      for layout in layouts
  }


def window_starts(length: int, window: int, stride: int) -> list[int]:
  """Return window starts that cover all `length` timesteps; the last window may be padded."""
  if window < 1 or not 1 <= stride <= window:
    raise ValueError(
        f'window stride {stride} with data.window={window}: the window must be at least 1 '
        'and the stride between 1 and the window, or timesteps would be skipped; lower '
        'data.train_stride.')
  starts = [0]
  while starts[-1] + window < length:
    starts.append(starts[-1] + stride)
  return starts


def make_windows(feature_sequences, layouts, scalers, window: int, stride: int) -> Windows:
  """Cut, scale and pad every sequence into windows of `window` timesteps."""
  index = [(i, start, min(window, fs.length - start))
           for i, fs in enumerate(feature_sequences)
           for start in window_starts(fs.length, window, stride)]
  index = np.asarray(index, np.int64).reshape(-1, 3)
  n = len(index)
  valid = np.zeros((n, window), bool)
  values = {l.name: np.zeros((n, window, l.num_features), np.float32) for l in layouts}
  observed = {l.name: np.zeros((n, window, l.num_features), bool) for l in layouts}
  scaled = [{l.name: scalers[l.name].transform(fs.values[l.name]) for l in layouts}
            for fs in feature_sequences]
  for row, (i, start, size) in enumerate(index):
    valid[row, :size] = True
    for layout in layouts:
      name = layout.name
      mask = feature_sequences[i].observed[name][start:start + size]
      observed[name][row, :size] = mask
      values[name][row, :size] = np.where(mask, scaled[i][name][start:start + size], 0.0)
  return Windows({'valid': valid, 'values': values, 'observed': observed}, index)
