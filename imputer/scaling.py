"""Robust scaling (median and interquartile range) fitted on observed training values only.

The statistics are saved with the run and with every checkpoint, so predictions and metrics
can always be turned back into the sensor's own units.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# A feature whose interquartile range is below this (in its own units) is only centred,
# because dividing by a near-zero spread would blow up its noise.
MIN_SCALE = 1e-6


@dataclasses.dataclass(frozen=True)
class GroupScaler:
  """Per-feature centre and scale of one group; `count` is how many values were fitted."""

  center: np.ndarray
  scale: np.ndarray
  count: np.ndarray

  def transform(self, values: np.ndarray) -> np.ndarray:
    return (values - self.center) / self.scale

  def inverse(self, scaled: np.ndarray, columns=slice(None)) -> np.ndarray:
    return scaled * self.scale[columns] + self.center[columns]

  def to_json(self) -> dict:
    return {k: getattr(self, k).tolist() for k in ('center', 'scale', 'count')}

  @classmethod
  def from_json(cls, data: dict) -> 'GroupScaler':
    return cls(*(np.asarray(data[k], np.float64) for k in ('center', 'scale', 'count')))


def fit_group(values: list[np.ndarray], observed: list[np.ndarray]) -> GroupScaler:
  """Fit one group from per-sequence (T, F) values and masks; NaN-free only where observed.

  A feature with no observed training value gets centre 0 and scale 1, and its count of 0
  is kept in the saved statistics.
  """
  stacked = np.concatenate(values, axis=0)
  mask = np.concatenate(observed, axis=0)
  masked = np.where(mask, stacked, np.nan)
  count = mask.sum(axis=0).astype(np.float64)
  empty = count == 0
  with np.errstate(all='ignore'):
    quartiles = np.nanpercentile(np.where(empty, 0.0, masked), [25, 50, 75], axis=0)
  center = np.where(empty, 0.0, quartiles[1])
  spread = quartiles[2] - quartiles[0]
  scale = np.where(empty | (spread < MIN_SCALE), 1.0, spread)
  return GroupScaler(center, scale, count)


def scalers_to_json(scalers: dict[str, GroupScaler]) -> dict:
  return {name: scaler.to_json() for name, scaler in scalers.items()}


def scalers_from_json(data: dict) -> dict[str, GroupScaler]:
  return {name: GroupScaler.from_json(item) for name, item in data.items()}
