"""Static per-group structure that the model, the masks and the evaluation share.

A `GroupLayout` combines a group's raw columns and sensors with its feature set. It holds only
numpy constants and Python values, so jitted functions close over it without retracing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from imputer import features
from imputer import recordings


@dataclasses.dataclass(frozen=True, eq=False)
class GroupLayout:
  """Channel layout of one group.

  Features 0..num_raw-1 are the raw columns; the rest are engineered from them. Masks are
  drawn per (timestep, sensor) and mapped to raw columns with `sensor_of_raw`, then to
  features with the dependency matrices of the feature set.
  """

  spec: recordings.GroupSpec
  feature_set: features.FeatureSet

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def num_raw(self) -> int:
    return len(self.spec.columns)

  @property
  def num_features(self) -> int:
    return self.feature_set.num_features

  @property
  def num_sensors(self) -> int:
    return len(self.spec.sensors)

  @property
  def sensor_of_raw(self) -> np.ndarray:
    return np.asarray(self.spec.sensor_of_column, np.int32)


def build_layouts(specs) -> tuple[GroupLayout, ...]:
  return tuple(
      GroupLayout(spec, features.feature_set(spec.features, spec.columns)) for spec in specs)
