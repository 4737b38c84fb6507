"""Sensor streams: a folder of recordings, each a sub-folder with one CSV file per sensor.

Layout: `<folder>/<subject>/<file>`, where every spec names one file and the sub-folder name
is the subject (one participant per sub-folder). Each file has a Unix-millisecond timestamp
column and the spec's value columns. Other columns are ignored. Rows may be out of order
(a file that wraps around once is sorted), and rows that share a timestamp are averaged.

The streams of a recording are resampled onto one clock grid at `rate_hz`, from the latest
stream start to the earliest stream end, so every present stream covers the whole grid. A
grid point takes, per stream, the nearest sample in time if it lies within the spec's
`max_gap_ms`, else that group is missing at that point. A missing value of the nearest
sample stays missing, even where a farther sample within `max_gap_ms` has a value. A stream
slower than the grid repeats each sample on every grid point it is nearest to.

Decisions on incomplete recordings:

* An input file that is missing, or that contains no data rows, raises ValueError naming
  the folder, the recording and the file. The model needs its inputs, so the folder must be
  fixed or the recording moved out.
* A target file that is missing or has no data rows leaves that target group missing at
  every grid point of the recording (no ground truth there). The recording still loads,
  the case is counted in `excluded`, and a warning names the file. A target group with no
  observed value in any recording raises ValueError, because that usually means a wrong
  file or column name.
* A row with fewer fields than the header, blank lines included, raises ValueError.
* A recording whose streams do not overlap in time is skipped and counted.

A spec with role 'label' (at most one, with one column) is not a channel group: it is aligned
like the others and kept per timestep in `Sequence.timestep_labels` (NaN where no sample lies
within its `max_gap_ms`). It takes no part in splitting recordings, and a missing label file
leaves the labels NaN, counted like a missing target file.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence as SequenceType

from absl import logging
import numpy as np
import polars as pl

from imputer import cmi
from imputer import features
from imputer import recordings

ROLES = ('input', 'target', 'label')
GROUP_ROLES = ('input', 'target')  # Roles that make channel groups; both are required.

_CONFIG_FIELDS = (
    'file', 'columns', 'role', 'features', 'missing_values', 'max_gap_ms', 'timestamp_column')
_REQUIRED_CONFIG_FIELDS = ('file', 'columns', 'role', 'max_gap_ms')


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamSpec:
  """One sensor file per recording, loaded as one channel group.

  `missing_values` are values that the sensor writes when it has no reading (such as 0 for
  heart rate). Empty fields and NaN are always missing. `max_gap_ms` is the largest distance
  in milliseconds between a grid point and the sample it takes.
  """

  group: str
  file: str
  columns: tuple[str, ...]
  role: str
  features: str = 'raw'
  missing_values: tuple[float, ...] = ()
  max_gap_ms: float
  timestamp_column: str = 'timestamp'

  def __post_init__(self):
    object.__setattr__(self, 'columns', tuple(self.columns))
    object.__setattr__(self, 'missing_values', tuple(float(v) for v in self.missing_values))
    prefix = f'stream group {self.group!r}'
    if not self.group:
      raise ValueError(f'stream group name is empty (file {self.file!r}). Give the group a name.')
    if self.role not in ROLES:
      raise ValueError(
          f"{prefix}: role {self.role!r} is invalid. Use 'input', 'target' or 'label'.")
    if self.role == 'label' and len(self.columns) != 1:
      raise ValueError(
          f'{prefix}: a label stream has one column, got {self.columns!r}. Name the single '
          'label column.')
    if not self.columns or not all(self.columns):
      raise ValueError(
          f'{prefix}: columns {self.columns!r} must be a non-empty list of column names, '
          f"such as 'x,y,z'.")
    if len(set(self.columns)) != len(self.columns):
      raise ValueError(f'{prefix}: columns {self.columns!r} repeat a name. List each column once.')
    if self.timestamp_column in self.columns:
      raise ValueError(
          f'{prefix}: the timestamp column {self.timestamp_column!r} is also listed in '
          f'columns. Remove it from columns.')
    if not math.isfinite(self.max_gap_ms) or self.max_gap_ms <= 0:
      raise ValueError(
          f'{prefix}: max_gap_ms {self.max_gap_ms!r} is invalid. Give a positive number of '
          f'milliseconds.')
    try:
      features.feature_set(self.features, self.columns)
    except ValueError as error:
      raise ValueError(f'{prefix}, field features: {error}') from error


def stream_specs_from_config(streams: Mapping[str, Mapping]) -> list[StreamSpec]:
  """Build specs from a mapping of group name to fields, keeping the mapping's order.

  Fields: file, columns ('x,y,z' or a list), role ('input', 'target' or 'label'), max_gap_ms, and
  optionally features (default 'raw'), missing_values ('0' or a list, may be empty) and
  timestamp_column (default 'timestamp'). Accepts dicts and ml_collections ConfigDicts. A
  ConfigDict lists its keys sorted by name (checked with ml_collections 1.1), so its groups
  come out in name order.
  """
  specs = [_spec_from_fields(str(group), fields) for group, fields in streams.items()]
  for role in GROUP_ROLES:
    if not any(spec.role == role for spec in specs):
      groups = ', '.join(f'{spec.group} ({spec.role})' for spec in specs) or 'none'
      raise ValueError(
          f'stream config has no group with role {role!r} (groups: {groups}). Set '
          f'role: {role} on at least one group.')
  return specs


def _spec_from_fields(group: str, fields) -> StreamSpec:
  if not hasattr(fields, 'items'):
    raise ValueError(
        f'stream group {group!r}: expected a mapping of fields, got {fields!r}.')
  fields = dict(fields.items())
  unknown = sorted(set(fields) - set(_CONFIG_FIELDS))
  if unknown:
    raise ValueError(
        f'stream group {group!r}: unknown field(s) {unknown}. Use {", ".join(_CONFIG_FIELDS)}.')
  missing = [name for name in _REQUIRED_CONFIG_FIELDS if name not in fields]
  if missing:
    raise ValueError(f'stream group {group!r}: required field(s) {missing} are missing.')

  optional = {}
  for name in ('features', 'timestamp_column'):
    if name in fields:
      optional[name] = str(fields[name])
  if 'missing_values' in fields:
    optional['missing_values'] = _parse_number_list(group, 'missing_values',
                                                    fields['missing_values'])
  return StreamSpec(
      group=group,
      file=str(fields['file']),
      columns=_parse_name_list(group, 'columns', fields['columns']),
      role=str(fields['role']),
      max_gap_ms=_parse_number(group, 'max_gap_ms', fields['max_gap_ms']),
      **optional)


def _split_list(value) -> list:
  if isinstance(value, str):
    return [item.strip() for item in value.split(',') if item.strip()]
  return list(value)


def _parse_name_list(group: str, field: str, value) -> tuple[str, ...]:
  names = tuple(str(name).strip() for name in _split_list(value))
  if not names or not all(names):
    raise ValueError(
        f"stream group {group!r}, field {field}: {value!r} names no column. Give names "
        f"such as 'x,y,z'.")
  return names


def _parse_number(group: str, field: str, value) -> float:
  if isinstance(value, bool):
    raise ValueError(f'stream group {group!r}, field {field}: {value!r} is not a number.')
  try:
    return float(value)
  except (TypeError, ValueError) as error:
    raise ValueError(
        f'stream group {group!r}, field {field}: {value!r} is not a number.') from error


def _parse_number_list(group: str, field: str, value) -> tuple[float, ...]:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (float(value),)
  return tuple(_parse_number(group, field, item) for item in _split_list(value))


@dataclasses.dataclass(frozen=True)
class _Stream:
  """One file's samples: strictly increasing timestamps (ms) and (N, C) values, NaN if missing."""

  timestamps: np.ndarray
  values: np.ndarray
  repeated_rows: int


def load_streams(folder: str, specs: SequenceType[StreamSpec], rate_hz: float,
                 split_gap_s: float = 5.0) -> recordings.RecordingSet:
  """Load every recording under `folder`, align its streams and split it at long gaps.

  A sub-folder that contains at least one spec file is a recording, and other sub-folders
  are counted in `excluded`. Each recording is cut into sequences 'subject/0', 'subject/1', ...
  wherever no stream has an observed value for longer than `split_gap_s`, so nothing is
  differenced across such a gap. The all-missing grid points of those gaps, and those at
  the start or end of a recording, are dropped and counted. See the module docstring for
  missing and empty files.

  Raises ValueError for a missing or empty folder, a missing column, a non-numeric value or
  timestamp, and for the cases the module docstring lists.
  """
  specs = tuple(specs)
  _check_load_arguments(specs, rate_hz, split_gap_s)
  subjects, excluded = _find_recordings(folder, specs)

  sequences = []
  loaded_recordings = 0
  for subject in subjects:
    recording_sequences, recording_excluded = _load_recording(
        folder, subject, specs, rate_hz, split_gap_s)
    excluded.update(recording_excluded)
    sequences.extend(recording_sequences)
    loaded_recordings += bool(recording_sequences)

  if not sequences:
    raise ValueError(
        f'no sequence could be loaded from {folder}. Excluded: {dict(excluded)}.')
  _check_every_group_observed(folder, specs, sequences)

  input_groups = tuple(_group_spec(spec) for spec in specs if spec.role == 'input')
  target_groups = tuple(_group_spec(spec) for spec in specs if spec.role == 'target')
  source = f'sensor streams in {folder} ({loaded_recordings} recordings at {rate_hz:g} Hz)'
  logging.info('%s: %d sequences. Excluded: %s', source, len(sequences), dict(excluded))
  return recordings.RecordingSet(source, input_groups, target_groups, sequences, excluded)


def _group_spec(spec: StreamSpec) -> recordings.GroupSpec:
  return recordings.single_sensor_group(spec.group, spec.columns, spec.features)


def _check_load_arguments(specs, rate_hz: float, split_gap_s: float) -> None:
  if not specs:
    raise ValueError('no stream specs given. Give at least one input and one target stream.')
  groups = [spec.group for spec in specs]
  repeated = sorted({group for group in groups if groups.count(group) > 1})
  if repeated:
    raise ValueError(f'stream groups {repeated} are given more than once. Name each group once.')
  for role in GROUP_ROLES:
    if not any(spec.role == role for spec in specs):
      raise ValueError(f'no stream has role {role!r}. Give at least one {role} stream.')
  labels = [spec.group for spec in specs if spec.role == 'label']
  if len(labels) > 1:
    raise ValueError(f'streams {labels} all have role label. Give at most one label stream.')
  if not math.isfinite(rate_hz) or rate_hz <= 0:
    raise ValueError(f'rate_hz {rate_hz!r} is invalid. Give a positive grid rate in Hz.')
  if not math.isfinite(split_gap_s) or split_gap_s <= 0:
    raise ValueError(f'split_gap_s {split_gap_s!r} is invalid. Give a positive number of seconds.')


def _find_recordings(folder: str, specs) -> tuple[list[str], collections.Counter]:
  """Return the sorted recording sub-folder names and the count of ignored sub-folders."""
  if not os.path.isdir(folder):
    raise ValueError(f'stream folder {folder} not found or not a directory.')
  files = sorted({spec.file for spec in specs})
  sub_folders = sorted(
      name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))
  if not sub_folders:
    raise ValueError(
        f'stream folder {folder} contains no sub-folders. Put each recording in its own '
        f'sub-folder with the files {files}.')

  subjects = []
  excluded = collections.Counter()
  for name in sub_folders:
    if any(os.path.isfile(os.path.join(folder, name, file)) for file in files):
      subjects.append(name)
    else:
      excluded['sub-folders without any stream file'] += 1
      logging.info('ignoring %s: it contains none of %s', os.path.join(folder, name), files)
  if not subjects:
    raise ValueError(
        f'no sub-folder of {folder} contains any of the stream files {files}. Check the '
        f'folder and the file names in the stream config.')
  return subjects, excluded


def _load_recording(folder: str, subject: str, specs, rate_hz: float, split_gap_s: float):
  """Return the sequences of one recording and a Counter of what it excluded."""
  streams, excluded = _read_recording_streams(folder, subject, specs)
  span_start, span_end = _common_span(list(streams.values()))
  grid = _clock_grid(span_start, span_end, rate_hz)
  if grid.size == 0:
    excluded['recordings whose streams do not overlap in time'] += 1
    logging.warning('%s: skipped because its streams do not overlap in time.', subject)
    return [], +excluded
  for group, stream in streams.items():
    outside = (stream.timestamps < span_start) | (stream.timestamps > span_end)
    excluded[f'{group}: samples outside the time span that all streams cover'] += int(
        outside.sum())

  aligned = _align_streams(streams, specs, grid)
  label = next((spec.group for spec in specs if spec.role == 'label'), None)
  labels = aligned.pop(label)[:, 0] if label else None
  # A run of n grid points lasts n / rate_hz seconds. The tolerance absorbs rounding.
  max_gap_points = int(math.floor(split_gap_s * rate_hz + 1e-9))
  segments, gap_points, edge_points = _split_at_gaps(_any_observed(aligned), max_gap_points)
  excluded[f'grid points in gaps longer than {split_gap_s:g} s with no observed value'] += (
      gap_points)
  excluded['grid points with no observed value at the start or end of a recording'] += (
      edge_points)

  sequences = []
  for index, (start, stop) in enumerate(segments):
    raw = {group: values[start:stop] for group, values in aligned.items()}
    observed = {group: ~np.isnan(values) for group, values in raw.items()}
    sequences.append(recordings.Sequence(
        f'{subject}/{index}', subject, raw, observed,
        timestep_labels=None if labels is None else labels[start:stop]))

  _log_recording(subject, grid, aligned, sequences, excluded)
  return sequences, +excluded


def _read_recording_streams(folder: str, subject: str, specs):
  """Return {group: _Stream} for the streams present in one recording, and what was excluded."""
  streams = {}
  excluded = collections.Counter()
  for spec in specs:
    path = os.path.join(folder, subject, spec.file)
    stream = _read_stream_or_none(folder, subject, spec)
    if stream is None:
      reason = 'file missing' if not os.path.isfile(path) else 'no data rows'
      excluded[f'{spec.group}: recordings without {spec.role} data ({reason})'] += 1
      logging.warning('Recording %r in %s: %s has no data (%s), so %s group %r is missing in '
                      'the whole recording.', subject, folder, path, reason, spec.role,
                      spec.group)
      continue
    streams[spec.group] = stream
    excluded[f'{spec.group}: rows sharing a timestamp, averaged into one'] += stream.repeated_rows
  return streams, excluded


def _align_streams(streams, specs, grid: np.ndarray) -> dict[str, np.ndarray]:
  """Return {group: (len(grid), C) values}, all NaN for an absent target stream."""
  aligned = {}
  for spec in specs:
    if spec.group in streams:
      stream = streams[spec.group]
      aligned[spec.group] = _nearest_within(stream.timestamps, stream.values, grid,
                                            spec.max_gap_ms)
    else:
      aligned[spec.group] = np.full((grid.size, len(spec.columns)), np.nan)
  return aligned


def _any_observed(aligned: dict[str, np.ndarray]) -> np.ndarray:
  """Return the (T,) mask of grid points where at least one value of any group is observed."""
  masks = [~np.isnan(values).all(axis=1) for values in aligned.values()]
  return np.logical_or.reduce(masks)


def _log_recording(subject: str, grid, aligned, sequences, excluded) -> None:
  observed = ', '.join(
      f'{group} {np.mean(~np.isnan(values).all(axis=1)):.1%}' for group, values in aligned.items())
  lengths = ', '.join(str(seq.length) for seq in sequences)
  logging.info(
      '%s: %d grid points, %d sequences (%s rows). Grid points with an observed value: %s. '
      'Excluded: %s', subject, grid.size, len(sequences), lengths, observed, dict(+excluded))


def _read_stream_or_none(folder: str, subject: str, spec: StreamSpec) -> _Stream | None:
  """Read one stream file, or return None for a target file that is missing or has no rows."""
  path = os.path.join(folder, subject, spec.file)
  if not os.path.isfile(path):
    if spec.role == 'input':
      raise ValueError(
          f'{path} not found: recording {subject!r} in {folder} lacks the input file '
          f'{spec.file!r} of group {spec.group!r}, which every recording needs. Add the file '
          'or move that recording folder out.')
    return None
  frame = _read_csv_as_text(path)
  if frame.height == 0:
    if spec.role == 'input':
      raise ValueError(
          f'{path} contains no data rows, so input group {spec.group!r} has no samples in '
          f'recording {subject!r}. Move that recording folder out or remove the group.')
    return None

  expected_columns = (spec.timestamp_column,) + spec.columns
  absent = [column for column in expected_columns if column not in frame.columns]
  if absent:
    raise ValueError(
        f'{path}: column(s) {absent} not found. The file has columns {frame.columns}. Fix '
        f'the file or the columns of group {spec.group!r}.')

  timestamps = _parse_column(path, frame, spec.timestamp_column, is_timestamp=True)
  values = np.stack([_parse_column(path, frame, column) for column in spec.columns], axis=1)
  if spec.missing_values:
    values[np.isin(values, spec.missing_values)] = np.nan
  return _average_repeated_timestamps(timestamps, values)


def _read_csv_as_text(path: str) -> pl.DataFrame:
  """Read every column as text, so that parsing errors can name the row and value.

  Raises ValueError for a row with fewer fields than the header, which would otherwise read
  as missing values.
  """
  try:
    frame = pl.read_csv(path, infer_schema_length=0)
  except pl.exceptions.NoDataError:
    return pl.DataFrame()
  except pl.exceptions.PolarsError as error:
    raise ValueError(f'{path}: failed to parse as CSV: {error}') from error
  cmi.check_csv_field_counts(path, frame.width)
  return frame


def _parse_column(path: str, frame: pl.DataFrame, column: str,
                  is_timestamp: bool = False) -> np.ndarray:
  """Parse one text column to float64, with NaN for empty fields (an error for timestamps).

  Raises ValueError at the first row whose field is not a number or is infinite, or, for a
  timestamp, is empty or NaN.
  """
  original = frame.get_column(column)
  text = original.str.strip_chars()
  numbers = text.cast(pl.Float64, strict=False)
  blank = (text.is_null() | (text == '')).fill_null(True).to_numpy()
  values = numbers.fill_null(np.nan).to_numpy().astype(np.float64)

  problem = np.full(values.shape, '', dtype=object)
  if is_timestamp:
    problem[np.isnan(values)] = 'is not a timestamp'
  problem[numbers.is_null().to_numpy() & ~blank] = 'is not a number'
  problem[np.isinf(values)] = 'is not finite'
  bad_rows = np.flatnonzero(problem != '')
  if bad_rows.size:
    row = int(bad_rows[0])
    field_text = 'an empty field' if blank[row] else f'value {original[row]!r}'
    fix = ('Every row needs a Unix time in milliseconds' if is_timestamp else
           'Correct or delete that row')
    raise ValueError(
        f'{path}: column {column!r}, data row {row + 1} (line {row + 2}): {field_text} '
        f'{problem[row]}. {fix}.')
  return values


def _average_repeated_timestamps(timestamps: np.ndarray, values: np.ndarray) -> _Stream:
  """Sort by time and average the rows that share a timestamp, ignoring missing values."""
  unique, inverse = np.unique(timestamps, return_inverse=True)
  observed = ~np.isnan(values)
  sums = np.zeros((unique.size, values.shape[1]))
  counts = np.zeros((unique.size, values.shape[1]))
  np.add.at(sums, inverse, np.where(observed, values, 0.0))
  np.add.at(counts, inverse, observed)
  with np.errstate(invalid='ignore'):
    means = sums / counts  # 0 / 0 gives NaN where no row of that timestamp was observed.
  return _Stream(unique, means, timestamps.size - unique.size)


def _common_span(streams: list[_Stream]) -> tuple[float, float]:
  """Return (latest stream start, earliest stream end) in ms. Start > end means no overlap."""
  start = max(stream.timestamps[0] for stream in streams)
  end = min(stream.timestamps[-1] for stream in streams)
  return start, end


def _clock_grid(start: float, end: float, rate_hz: float) -> np.ndarray:
  """Return grid times (ms) from start to at most end, empty when end < start."""
  if end < start:
    return np.zeros(0)
  # The small tolerance keeps the last point when (end - start) is a whole number of steps.
  count = int(math.floor((end - start) * rate_hz / 1000.0 + 1e-9)) + 1
  return start + np.arange(count) * (1000.0 / rate_hz)


def _nearest_within(timestamps: np.ndarray, values: np.ndarray, grid: np.ndarray,
                    max_gap_ms: float) -> np.ndarray:
  """Return (len(grid), C) values of the nearest sample, NaN where it is over max_gap_ms away.

  A grid point exactly halfway between two samples takes the earlier one.
  """
  after = np.searchsorted(timestamps, grid, side='left')
  before = np.clip(after - 1, 0, timestamps.size - 1)
  after = np.clip(after, 0, timestamps.size - 1)
  take_before = np.abs(grid - timestamps[before]) <= np.abs(timestamps[after] - grid)
  nearest = np.where(take_before, before, after)
  close = np.abs(timestamps[nearest] - grid) <= max_gap_ms
  return np.where(close[:, None], values[nearest], np.nan)


def _split_at_gaps(any_observed: np.ndarray, max_gap_points: int):
  """Return kept row ranges [(start, stop)], dropped gap points and dropped edge points.

  A run of grid points with no observed value is dropped when it has more than
  `max_gap_points` points (and the recording is split there) or when it touches the start
  or end of the grid. Shorter interior runs stay in their sequence as missing rows.
  """
  length = any_observed.size
  keep = np.ones(length, bool)
  gap_points = 0
  edge_points = 0
  for start, stop in _runs(~any_observed):
    if start == 0 or stop == length:
      keep[start:stop] = False
      edge_points += stop - start
    elif stop - start > max_gap_points:
      keep[start:stop] = False
      gap_points += stop - start
  return _runs(keep), gap_points, edge_points


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
  """Return the [start, stop) ranges of consecutive True values."""
  padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
  change = np.diff(padded)
  return list(zip(np.flatnonzero(change == 1).tolist(), np.flatnonzero(change == -1).tolist()))


def _check_every_group_observed(folder: str, specs, sequences) -> None:
  for spec in (spec for spec in specs if spec.role in GROUP_ROLES):
    if not any(seq.observed[spec.group].any() for seq in sequences):
      raise ValueError(
          f'group {spec.group!r} has no observed value in any recording under {folder}. Check '
          f'its file {spec.file!r}, columns {spec.columns} and missing_values '
          f'{spec.missing_values}.')
