"""In-memory recordings: the common form that every data source produces.

A source (the CMI table, a folder of sensor streams, the synthetic generator) turns its files
into a `RecordingSet`. Everything downstream (features, folds, scaling, windows) reads only
this form, so a new source needs no change anywhere else.

Raw values keep NaN where a value is missing, and `observed` is built by the source from the
raw file before anything is filled. Padding does not exist at this level: it appears only
when sequences are cut into fixed-length windows.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """A channel group: its raw columns, its sensors (the masking units) and its feature set.

  `sensor_of_column[i]` is the index in `sensors` of the sensor that produced column i. A
  training mask hides whole sensors at a timestep, so the 64 pixels of one ToF sensor are
  hidden together.
  """

  name: str
  columns: tuple[str, ...]
  sensors: tuple[str, ...]
  sensor_of_column: tuple[int, ...]
  features: str = 'raw'

  def __post_init__(self):
    if len(self.sensor_of_column) != len(self.columns):
      raise ValueError(
          f'group {self.name!r}: sensor_of_column has {len(self.sensor_of_column)} entries '
          f'for {len(self.columns)} columns; give one sensor index per column.')
    bad = [i for i in self.sensor_of_column if not 0 <= i < len(self.sensors)]
    if bad:
      raise ValueError(
          f'group {self.name!r}: sensor indices {bad} are outside 0..{len(self.sensors) - 1}.')


def single_sensor_group(name: str, columns, features: str = 'raw') -> GroupSpec:
  """Build a group whose columns all come from one sensor, named after the group."""
  columns = tuple(columns)
  return GroupSpec(name, columns, (name,), (0,) * len(columns), features)


@dataclasses.dataclass
class Sequence:
  """One recording: rows ordered in time, each group as a (T, C_raw) array.

  `raw[g]` is float64 with NaN where the value is missing. `observed[g]` is the boolean mask
  built from the file before any filling, with the same shape.
  """

  sequence_id: str
  subject: str
  raw: dict[str, np.ndarray]
  observed: dict[str, np.ndarray]
  label: str | None = None
  # The CMI table's sequence_type ('Target' or 'Non-Target') when the file has the column.
  sequence_type: str | None = None
  # A (T,) label per timestep from a stream with role 'label', NaN where none was recorded.
  timestep_labels: np.ndarray | None = None

  @property
  def length(self) -> int:
    return next(iter(self.raw.values())).shape[0]

  def has_target_truth(self, target_names) -> bool:
    """Return whether any target group has at least one observed value."""
    return any(bool(self.observed[name].any()) for name in target_names)


@dataclasses.dataclass
class RecordingSet:
  """All sequences of a data source with its group layout.

  `source` is a short description that every log line and report repeats, such as
  'synthetic CMI-schema data (seed 0)' or 'CMI file train.csv'. `excluded` counts what the
  source left out, keyed by the reason, so nothing disappears silently.
  """

  source: str
  input_groups: tuple[GroupSpec, ...]
  target_groups: tuple[GroupSpec, ...]
  sequences: list[Sequence]
  excluded: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def groups(self) -> tuple[GroupSpec, ...]:
    return self.input_groups + self.target_groups

  @property
  def subjects(self) -> list[str]:
    return sorted({seq.subject for seq in self.sequences})

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.target_groups)

  def select_subjects(self, subjects) -> list[Sequence]:
    wanted = set(subjects)
    return [seq for seq in self.sequences if seq.subject in wanted]
