"""The CMI wrist-device table ("CMI - Detect Behavior with Sensor Data") as a `RecordingSet`.

The table has one row per timestep. Rows of one recording share a `sequence_id` and are ordered
by `sequence_counter`. The inputs are the IMU (acc_x..acc_z in m/s² including gravity, and the
scalar-first quaternion rot_w..rot_z). The targets are five thermopiles thm_1..thm_5 in °C and
five 8x8 time-of-flight sensors tof_1_v0..tof_5_v63. ToF values are distances where -1 means
"no return". An empty cell or NaN marks a missing value in every sensor column.
"""

from __future__ import annotations

import collections
import csv
import os
import pathlib

import numpy as np
import polars as pl

from imputer import features
from imputer.recordings import GroupSpec, RecordingSet, Sequence

CMI_TOF_SENSORS = tuple(f'tof_{sensor}' for sensor in range(1, 6))
CMI_TOF_PIXELS = 64  # One 8x8 grid per sensor, pixels v0..v63 in row-major order.
CMI_TOF_COLUMNS = tuple(
    f'{sensor}_v{pixel}' for sensor in CMI_TOF_SENSORS for pixel in range(CMI_TOF_PIXELS))
CMI_LABEL_COLUMNS = ('sequence_type', 'orientation', 'behavior', 'phase', 'gesture')
CMI_ID_COLUMNS = ('sequence_id', 'sequence_counter', 'subject')
CMI_SENSOR_COLUMNS = features.CMI_IMU_COLUMNS + features.CMI_THM_COLUMNS + CMI_TOF_COLUMNS
CMI_REQUIRED_COLUMNS = CMI_ID_COLUMNS + CMI_SENSOR_COLUMNS

# The column order of the competition's train.csv. Its test.csv lacks the label columns.
CMI_TRAIN_COLUMNS = (
    'row_id', 'sequence_type', 'sequence_id', 'sequence_counter', 'subject', 'orientation',
    'behavior', 'phase', 'gesture') + CMI_SENSOR_COLUMNS

TOF_NO_RETURN = -1.0
TOF_NO_RETURN_CHOICES = ('missing', 'far')

# The largest magnitude a sensor value may have. Accelerations in m/s², unit-quaternion
# components, temperatures in °C and ToF distances never come near it, so a larger value is a
# fill value or a corrupted cell, such as 1e30 written for "no data". Left in, it would reach
# the model as a scaled input orders of magnitude above the others and swamp the loss of every
# batch that contains it.
MAX_SENSOR_MAGNITUDE = 1e6
# The largest span of sequence_counter values within one sequence. Every skipped counter
# becomes a row of missing values, and 100,000 rows of the 332 sensor columns take about
# 300 MB, so a larger span is taken as a wrong counter value.
MAX_SEQUENCE_SPAN = 100_000

_TEXT_COLUMNS = ('row_id', 'sequence_id', 'subject') + CMI_LABEL_COLUMNS
NUMERIC_COLUMNS = ('sequence_counter',) + CMI_SENSOR_COLUMNS
_SUMMARY_RUN = 3  # Runs of at least this many consecutive missing names print as 'first..last'.
_CSV_CHUNK_BYTES = 1 << 24  # Bytes read at a time when counting the commas of a CSV file.


def cmi_groups() -> tuple[tuple[GroupSpec, ...], tuple[GroupSpec, ...]]:
  """Return the (input groups, target groups) of the CMI table: (imu,) and (thm, tof)."""
  imu = GroupSpec(
      'imu', features.CMI_IMU_COLUMNS, sensors=('acc', 'rot'),
      sensor_of_column=(0, 0, 0, 1, 1, 1, 1), features='cmi_imu')
  thm = GroupSpec(
      'thm', features.CMI_THM_COLUMNS, sensors=features.CMI_THM_COLUMNS,
      sensor_of_column=tuple(range(len(features.CMI_THM_COLUMNS))), features='cmi_thm')
  tof = GroupSpec(
      'tof', CMI_TOF_COLUMNS, sensors=CMI_TOF_SENSORS,
      sensor_of_column=tuple(i // CMI_TOF_PIXELS for i in range(len(CMI_TOF_COLUMNS))),
      features='raw')
  return (imu,), (thm, tof)


def read_table(path: str) -> pl.DataFrame:
  """Read a .csv or .parquet table, raising ValueError for a missing, empty or unknown file.

  CSV sensor columns are parsed as Float64. When a cell does not parse as a number, the file is
  read again with the column types inferred from every row, so that the column comes out as
  text and `from_cmi_frame` can report the offending row and value.
  """
  file = check_table_path(path)
  frame = _read_csv(file) if file.suffix.lower() == '.csv' else _read_parquet(file)
  if frame.height == 0:
    raise ValueError(
        f'{path}: the table has a header but no data rows; check that the export wrote the rows.')
  return frame


def check_table_path(path: str) -> pathlib.Path:
  """Raise ValueError unless `path` is an existing, non-empty .csv or .parquet file."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f'{path}: file not found; give the path of an existing .csv or .parquet file.')
  if file.suffix.lower() not in ('.csv', '.parquet'):
    raise ValueError(
        f'{path}: unknown file type {file.suffix!r}; give a .csv or .parquet file, or convert '
        f'the table to one of them.')
  if file.stat().st_size == 0:
    raise ValueError(
        f'{path}: the file is empty; write the table with its header row and data rows.')
  return file


def check_csv_field_counts(path, num_columns: int) -> None:
  """Raise ValueError at the first CSV row that has fewer fields than the header.

  A CSV reader fills the absent fields of a short row with nulls, and a blank line becomes a
  row of nulls, so both would pass as missing values. A row cut off at the end of a file that
  was not copied completely is the common case, but a short row can sit anywhere.

  Without quote characters, a complete row has exactly num_columns - 1 commas, and the parser
  has already rejected rows with too many fields. So the file is complete when its commas
  number (num_columns - 1) times its lines. Counting both in the raw bytes takes under half a
  second for a 560 MB file on one CPU core. Only when the counts disagree, or the file has quoted
  fields whose commas may be data, are the rows read one by one to find the short row.
  """
  commas, newlines, quoted, ends_with_newline = _count_csv_bytes(path)
  lines = newlines if ends_with_newline else newlines + 1
  if not quoted and commas == lines * (num_columns - 1):
    return
  _raise_at_short_row(path, num_columns)


def _count_csv_bytes(path) -> tuple[int, int, bool, bool]:
  """Return (commas, newlines, any quote character, ends with a newline) of a file's bytes."""
  commas = newlines = 0
  quoted = False
  last = 0
  # One buffer for every chunk, so that reading allocates no new memory.
  buffer = bytearray(_CSV_CHUNK_BYTES)
  matches = np.empty(_CSV_CHUNK_BYTES, bool)
  with open(path, 'rb', buffering=0) as f:
    while size := f.readinto(buffer):
      data = np.frombuffer(buffer, np.uint8, count=size)
      np.equal(data, ord(','), out=matches[:size])
      commas += int(np.count_nonzero(matches[:size]))
      np.equal(data, ord('\n'), out=matches[:size])
      newlines += int(np.count_nonzero(matches[:size]))
      quoted = quoted or buffer.find(b'"', 0, size) >= 0
      last = buffer[size - 1]
  return commas, newlines, quoted, last == ord('\n')


def _raise_at_short_row(path, num_columns: int) -> None:
  """Raise ValueError at the first data row with fewer than `num_columns` fields, if any.

  Data rows are numbered like the parser's rows: from 1 after the header, with a blank line
  counting as a row.
  """
  # NOTE: this pass takes about 6 s for a 560 MB file (Python 3.11 csv module, one CPU core),
  # which every load of a file with quoted fields pays.
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    reader = csv.reader(f)
    try:
      next(reader, None)  # The header.
      line = reader.line_num + 1
      for row, fields in enumerate(reader, start=1):
        if len(fields) < num_columns:
          is_last = next(reader, None) is None
          raise ValueError(_short_row_message(path, row, line, len(fields), num_columns, is_last))
        line = reader.line_num + 1
    except csv.Error as error:
      raise ValueError(
          f'{path}: could not be parsed as CSV at line {reader.line_num} ({error}); check the '
          'quoting of that line.') from error


def _short_row_message(path, row: int, line: int, fields: int, num_columns: int,
                       is_last: bool) -> str:
  where = f'data row {row} (line {line})'
  if fields == 0:
    return (f'{path}: {where} is blank, and a CSV reader fills a blank line with empty '
            'values; delete the blank line.')
  if is_last:
    return (f"{path}: the last row has {fields} of the header's {num_columns} fields (data row "
            f'{row}, line {line}), so the file looks cut off; copy or export the complete file '
            'again.')
  return (f"{path}: {where} has {fields} of the header's {num_columns} fields, and its absent "
          'fields would read as missing values; repair that row or export the file again.')


def read_csv_header(file) -> list[str]:
  """Return the column names of a CSV file, raising ValueError when it has no header row."""
  try:
    return pl.read_csv(file, n_rows=0).columns
  except pl.exceptions.NoDataError as error:
    raise ValueError(
        f'{file}: the file has no header row ({error}); write the table with its header row and '
        f'data rows.') from error


def csv_schema_overrides(header) -> dict:
  """Return the column types a CMI CSV is read with: text ids and labels, Float64 numbers."""
  text_types = {name: pl.String for name in header if name in _TEXT_COLUMNS}
  numeric_types = {name: pl.Float64 for name in header if name in NUMERIC_COLUMNS}
  return {**text_types, **numeric_types}


def _read_csv(file: pathlib.Path) -> pl.DataFrame:
  header = read_csv_header(file)
  frame = _parse_csv(file, header)
  # Checked after parsing, so that a parser error (such as an open quote) is named first.
  check_csv_field_counts(file, len(header))
  return frame


def _parse_csv(file: pathlib.Path, header: list[str]) -> pl.DataFrame:
  text_types = {name: pl.String for name in header if name in _TEXT_COLUMNS}
  try:
    return pl.read_csv(file, schema_overrides=csv_schema_overrides(header))
  except pl.exceptions.ComputeError:
    pass
  # A cell that is not a number. Full inference reads that column as text instead, so that
  # from_cmi_frame can name the row and value.
  # NOTE: full inference is slow: about a minute for a 570k-row, 640 MB CSV on 2 CPU cores.
  try:
    return pl.read_csv(file, schema_overrides=text_types, infer_schema_length=None)
  except pl.exceptions.PolarsError as error:
    raise ValueError(
        f'{file}: could not be parsed as CSV ({error}); check the quoting and the number of '
        f'fields in each row.') from error


def _read_parquet(file: pathlib.Path) -> pl.DataFrame:
  try:
    return pl.read_parquet(file)
  except (pl.exceptions.PolarsError, OSError) as error:
    raise ValueError(
        f'{file}: could not be read as a parquet file ({error}); check that the file is complete '
        f'and was written as parquet.') from error


def load_cmi(
    path: str, tof_no_return: str = 'missing', tof_far_value: float = 255.0) -> RecordingSet:
  """Read a CMI train.csv or test.csv (or a parquet copy) into a `RecordingSet`."""
  frame = read_table(path)
  return from_cmi_frame(frame, f'CMI file {path}', tof_no_return, tof_far_value)


def from_cmi_frame(
    frame: pl.DataFrame, source: str, tof_no_return: str = 'missing',
    tof_far_value: float = 255.0, first_row: int = 1) -> RecordingSet:
  """Group a CMI-schema frame into sequences with raw values and observed masks.

  `source` names the data in every error and in the returned set. `tof_no_return` decides what
  a ToF value of -1 becomes. With 'missing' the pixel is unobserved, and with 'far' it is
  observed with the value `tof_far_value`. Label columns are optional, and the gesture, when
  present, becomes `Sequence.label`. Other columns are ignored. `first_row` is the data row
  number of the frame's first row in its file, so errors about a part of a file name the
  file's row. Sequences keep the order of
  their first row in the frame, and rows within a sequence are sorted by sequence_counter, so
  the rows of a sequence may come in any order. Two rows of a sequence with the same counter
  raise ValueError, which says whether they are identical copies.
  """
  _check_options(source, tof_no_return, tof_far_value)
  check_columns(frame.columns, source)
  if frame.height == 0:
    raise ValueError(f'{source}: the table has no rows; give a table with at least one data row.')

  input_groups, target_groups = cmi_groups()
  values = _sensor_values(frame, input_groups + target_groups, source, first_row)
  sequence_ids = _text_column(frame, 'sequence_id', source, first_row=first_row)
  subjects = _text_column(frame, 'subject', source, first_row=first_row)
  counters = _counter_column(frame, source, first_row)

  order, starts = _sequence_order(sequence_ids, counters)
  _check_unique_counters(order, starts, sequence_ids, counters, frame, source, first_row)
  _check_counter_spans(order, starts, sequence_ids, counters, source, first_row)
  _check_constant_within_sequence(order, starts, sequence_ids, subjects, 'subject', source,
                                  first_row)
  labels = None
  if 'gesture' in frame.columns:
    labels = _text_column(frame, 'gesture', source, allow_null=True, first_row=first_row)
    _check_constant_within_sequence(order, starts, sequence_ids, labels, 'gesture', source,
                                    first_row)
  kinds = None
  if 'sequence_type' in frame.columns:
    kinds = _text_column(frame, 'sequence_type', source, allow_null=True, first_row=first_row)
    _check_constant_within_sequence(order, starts, sequence_ids, kinds, 'sequence_type', source,
                                    first_row)

  excluded = _count_unusable(values, tof_no_return)
  raw, observed = {}, {}
  already_sorted = bool((order == np.arange(len(order))).all())
  for name in list(values):
    sorted_values = values.pop(name)
    if not already_sorted:
      sorted_values = sorted_values[order]
    raw[name], observed[name] = _observe(name, sorted_values, tof_no_return, tof_far_value)

  sequences = []
  ends = list(starts[1:]) + [len(order)]
  sorted_counters = counters[order]
  for start, end in zip(starts, ends):
    head = order[start]
    sequence = Sequence(
        sequence_id=sequence_ids[head],
        subject=subjects[head],
        raw={name: group_values[start:end] for name, group_values in raw.items()},
        observed={name: mask[start:end] for name, mask in observed.items()},
        label=None if labels is None else labels[head],
        sequence_type=None if kinds is None else kinds[head])
    inserted = _fill_counter_gaps(sequence, sorted_counters[start:end])
    if inserted:
      excluded['rows missing from a sequence_counter gap, inserted as missing values'] += inserted
    sequences.append(sequence)
  return RecordingSet(source, input_groups, target_groups, sequences, excluded)


def _fill_counter_gaps(sequence: Sequence, counters: np.ndarray) -> int:
  """Insert unobserved rows where `counters` skips values; return how many were inserted.

  A skipped counter is a timestep that the file lacks. Keeping it as a missing row stops
  rates and differences from being computed across the gap as if the rows were adjacent.
  """
  positions = (counters - counters[0]).astype(np.int64)
  length = int(positions[-1]) + 1
  if length == len(counters):
    return 0
  for name in list(sequence.raw):
    raw = np.full((length,) + sequence.raw[name].shape[1:], np.nan)
    observed = np.zeros(raw.shape, bool)
    raw[positions] = sequence.raw[name]
    observed[positions] = sequence.observed[name]
    sequence.raw[name], sequence.observed[name] = raw, observed
  return length - len(counters)


def _count_unusable(values: dict[str, np.ndarray], tof_no_return: str) -> collections.Counter:
  """Count the readings that the file has but that become missing values."""
  excluded = collections.Counter()
  quaternion = values['imu'][:, 3:7]
  with np.errstate(invalid='ignore'):
    zero = (np.nan_to_num(quaternion) == 0).all(axis=1) & np.isfinite(quaternion).any(axis=1)
    partial = np.isnan(quaternion).any(axis=1) & ~np.isnan(quaternion).all(axis=1)
  if zero.any():
    excluded['imu: rows with a zero quaternion, treated as missing orientation'] = int(zero.sum())
  if partial.any():
    excluded['imu: rows with a partly missing quaternion, treated as missing orientation'] = int(
        partial.sum())
  if tof_no_return == 'missing':
    no_return = int((values['tof'] == TOF_NO_RETURN).sum())
    if no_return:
      excluded['tof: no-return (-1) pixel values, treated as missing'] = no_return
  return excluded


def _check_options(source: str, tof_no_return: str, tof_far_value: float) -> None:
  if tof_no_return not in TOF_NO_RETURN_CHOICES:
    raise ValueError(
        f'{source}: invalid tof_no_return {tof_no_return!r}; use one of '
        f'{", ".join(repr(choice) for choice in TOF_NO_RETURN_CHOICES)}.')
  if not np.isfinite(tof_far_value):
    raise ValueError(
        f'{source}: invalid tof_far_value {tof_far_value!r}; give a finite distance such as 255.')


def check_columns(columns, source: str) -> None:
  """Raise ValueError naming every required CMI column that `columns` lacks."""
  present = set(columns)
  missing = [name for name in CMI_REQUIRED_COLUMNS if name not in present]
  if missing:
    raise ValueError(
        f'{source}: missing {len(missing)} required column(s): '
        f'{_summarize_names(missing, CMI_REQUIRED_COLUMNS)}. A CMI table needs sequence_id, '
        f'sequence_counter, subject, acc_x..rot_z, thm_1..thm_5 and tof_1_v0..tof_5_v63; check '
        f'that the file is a CMI train.csv or test.csv export with its header row.')


def _summarize_names(names, order) -> str:
  """Join `names`, writing each run of consecutive entries of `order` as 'first..last'."""
  position = {name: i for i, name in enumerate(order)}
  runs: list[list[str]] = []
  for name in names:
    if runs and position[name] == position[runs[-1][-1]] + 1:
      runs[-1].append(name)
    else:
      runs.append([name])
  parts = [f'{run[0]}..{run[-1]}' if len(run) >= _SUMMARY_RUN else ', '.join(run) for run in runs]
  return ', '.join(parts)


def _sensor_values(frame: pl.DataFrame, groups, source: str, first_row: int = 1) -> dict[str, np.ndarray]:
  """Convert each group's columns to a (N, C) float64 array in frame row order, NaN where empty.

  Raises ValueError for a cell that is not a number, for a value beyond
  ±MAX_SENSOR_MAGNITUDE (infinities included) and for an invalid ToF distance.
  """
  values = {}
  for group in groups:
    columns = pl.DataFrame([float_column(frame[name], source, first_row)
                            for name in group.columns])
    # Without nulls the row-major copy is faster: 2 s instead of 5 s for the ToF columns of
    # 570k rows (polars 2.1, 2 CPU cores).
    columns = columns.fill_null(np.nan)
    values[group.name] = columns.to_numpy(order='c')
    _check_magnitude(values[group.name], group.columns, source, first_row)
  _check_tof_values(values['tof'], source, first_row)
  return values


def _check_magnitude(values: np.ndarray, columns, source: str, first_row: int = 1) -> None:
  """Raise ValueError at the first value beyond ±MAX_SENSOR_MAGNITUDE, such as 1e30 or inf.

  The value raises instead of becoming a missing value, because a file in other units, for
  which the bound is wrong, should not load with holes.
  """
  # fmax and fmin skip NaN and allocate nothing, so a clean array costs two passes. They
  # return NaN when every value is NaN, and NaN compares False.
  if not (np.fmax.reduce(values, axis=None) > MAX_SENSOR_MAGNITUDE
          or np.fmin.reduce(values, axis=None) < -MAX_SENSOR_MAGNITUDE):
    return
  with np.errstate(invalid='ignore'):
    row, column = np.argwhere(np.abs(values) > MAX_SENSOR_MAGNITUDE)[0]
  value = values[row, column]
  prefix = f'{source}: column {columns[column]!r} contains the'
  fix = 'correct it, or leave the cell empty or write NaN to mark it missing.'
  if np.isinf(value):
    raise ValueError(f'{prefix} infinite value {value:g} at data row {row + first_row}; {fix}')
  raise ValueError(
      f'{prefix} value {value:g} at data row {row + first_row}, beyond ±{MAX_SENSOR_MAGNITUDE:g}, '
      f'which no sensor reading reaches, so it is a fill value or a corrupted cell; {fix}')


def float_column(column: pl.Series, source: str, first_row: int = 1,
                 fix: str = 'correct the value, or leave the cell empty or write NaN to mark it '
                            'missing') -> pl.Series:
  """Cast one column to Float64, raising ValueError at its first cell that is not a number.

  `fix` ends the message: what the user should write instead.
  """
  if column.dtype.is_numeric() or column.dtype == pl.Null:
    return column.cast(pl.Float64)
  if column.dtype != pl.String:
    raise ValueError(
        f'{source}: column {column.name!r} has the type {column.dtype}, expected numbers; convert '
        f'it to a numeric column.')

  text = column.str.strip_chars()
  values = text.cast(pl.Float64, strict=False)
  # Empty cells are missing values. "NaN" and "nan" parse to NaN, which is also missing.
  invalid = text.is_not_null() & (text != '') & values.is_null()
  if invalid.any():
    row = int(invalid.arg_true()[0])
    raise ValueError(
        f'{source}: column {column.name!r} contains the non-numeric value {column[row]!r} at data '
        f'row {row + first_row} (counting data rows from 1, after the header); {fix}.')
  return values


def _check_tof_values(tof: np.ndarray, source: str, first_row: int = 1) -> None:
  """Raise ValueError at the first negative ToF distance other than the no-return value -1."""
  with np.errstate(invalid='ignore'):
    negative = tof < 0
  if not negative.any() or (tof[negative] == TOF_NO_RETURN).all():
    return
  row, column = np.argwhere(negative & (tof != TOF_NO_RETURN))[0]
  raise ValueError(
      f'{source}: column {CMI_TOF_COLUMNS[column]!r} contains the negative distance '
      f'{tof[row, column]:g} at data row {row + first_row}; ToF distances are >= 0, with -1 for no '
      f'return and an empty cell or NaN for a missing value, so correct that value.')


def _text_column(
    frame: pl.DataFrame, name: str, source: str, allow_null: bool = False,
    first_row: int = 1) -> np.ndarray:
  """Convert a column to a numpy array of str, raising ValueError at a null unless `allow_null`."""
  column = frame[name].cast(pl.String)
  if not allow_null and column.null_count() > 0:
    row = int(column.is_null().arg_true()[0])
    raise ValueError(
        f'{source}: column {name!r} is empty at data row {row + first_row}; every row needs a {name}, '
        f'so fill it in or remove the row.')
  return column.to_numpy().astype(object)


def _counter_column(frame: pl.DataFrame, source: str, first_row: int = 1) -> np.ndarray:
  counters = float_column(
      frame['sequence_counter'], source, first_row,
      fix='write the whole-number position of the row in its sequence (0, 1, 2, ...)').to_numpy()
  missing = ~np.isfinite(counters)
  if missing.any():
    row = int(np.flatnonzero(missing)[0])
    raise ValueError(
        f'{source}: column \'sequence_counter\' is missing or not finite at data row {row + first_row}; '
        f'every row needs its position in the sequence, so fill it in or remove the row.')
  fractional = counters != np.round(counters)
  if fractional.any():
    row = int(np.flatnonzero(fractional)[0])
    raise ValueError(
        f'{source}: column \'sequence_counter\' contains the non-integer value '
        f'{counters[row]:g} at data row {row + first_row}; counters number the timesteps 0, 1, 2, ..., '
        'so write whole numbers.')
  return counters


def _sequence_order(
    sequence_ids: np.ndarray, counters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Return the row order (sequences by first appearance, rows by counter) and sequence starts.

  `order[starts[k]]` is the first row of sequence k in the sorted order.
  """
  ids = pl.DataFrame({'sequence_id': pl.Series(sequence_ids, dtype=pl.String)})
  first_rows = ids.with_row_index('row').select(pl.col('row').min().over('sequence_id'))
  first_rows = first_rows.to_series().to_numpy()
  order = np.lexsort((counters, first_rows))
  starts = np.flatnonzero(np.diff(first_rows[order], prepend=-1))
  return order, starts


def _check_unique_counters(order, starts, sequence_ids, counters, frame: pl.DataFrame,
                           source: str, first_row: int = 1) -> None:
  """Raise ValueError at the first sequence with two rows of the same sequence_counter."""
  sorted_counters = counters[order]
  same_sequence = np.ones(len(order), dtype=bool)
  same_sequence[starts] = False
  repeated = same_sequence[1:] & (sorted_counters[1:] == sorted_counters[:-1])
  if not repeated.any():
    return
  position = int(np.flatnonzero(repeated)[0]) + 1
  first, second = sorted((int(order[position - 1]), int(order[position])))
  duplicate = (f'{source}: sequence {sequence_ids[first]!r} has sequence_counter '
               f'{sorted_counters[position]:g} twice (data rows {first + first_row} and '
               f'{second + first_row})')
  pair = frame[[first, second]]
  differing = [name for name in pair.columns if pair[name].n_unique() > 1]
  if not differing:
    raise ValueError(
        f'{duplicate}, and the two rows are identical, so one is a copy of the other; remove '
        'one of them.')
  raise ValueError(
      f'{duplicate}, and the rows differ in {_summarize_names(differing, pair.columns)}; every '
      'row of a sequence needs its own counter, so remove the wrong row or correct its counter.')


def _check_counter_spans(order, starts, sequence_ids, counters, source: str,
                         first_row: int = 1) -> None:
  """Raise ValueError at the first sequence whose counters span over MAX_SEQUENCE_SPAN."""
  sorted_counters = counters[order]
  lasts = np.append(starts[1:], len(order)) - 1
  spans = sorted_counters[lasts] - sorted_counters[starts] + 1
  too_long = np.flatnonzero(spans > MAX_SEQUENCE_SPAN)
  if not too_long.size:
    return
  k = int(too_long[0])
  low, high = int(order[starts[k]]), int(order[lasts[k]])
  raise ValueError(
      f'{source}: sequence {sequence_ids[low]!r} has sequence_counter values from '
      f'{counters[low]:g} (data row {low + first_row}) to {counters[high]:g} (data row '
      f'{high + first_row}), a span of {spans[k]:g} timesteps; every skipped counter becomes a '
      f'missing row, and a sequence may span at most {MAX_SEQUENCE_SPAN} timesteps. Correct '
      'the counter values, or give separate recordings their own sequence_ids.')


def _check_constant_within_sequence(order, starts, sequence_ids, values, name: str, source: str,
                                    first_row: int = 1):
  sorted_values = values[order]
  same_sequence = np.ones(len(order), dtype=bool)
  same_sequence[starts] = False
  changed = same_sequence[1:] & (sorted_values[1:] != sorted_values[:-1])
  if changed.any():
    position = int(np.flatnonzero(changed)[0]) + 1
    first, second = int(order[position - 1]), int(order[position])
    raise ValueError(
        f'{source}: sequence {sequence_ids[first]!r} has more than one {name}: '
        f'{values[first]!r} at data row {first + first_row} and {values[second]!r} at data row '
        f'{second + first_row}; a sequence must have a single {name}, so correct the {name} column or give '
        f'the rows separate sequence_ids.')


def _observe(group: str, values: np.ndarray, tof_no_return: str, tof_far_value: float):
  """Build the observed mask of one group's (N, C) values and set the unobserved values to NaN.

  Returns (raw, observed). `values` is modified in place and returned as raw, because a copy of
  the ToF array of the full CMI train.csv costs about 1.5 GB.
  """
  observed = np.isfinite(values)
  if group == 'imu':
    quaternion = values[:, 3:7]
    with np.errstate(invalid='ignore'):
      usable = observed[:, 3:7].all(axis=1) & (np.linalg.norm(quaternion, axis=1) > 0)
    observed[:, 3:7] = usable[:, None]
  elif group == 'tof':
    no_return = values == TOF_NO_RETURN
    if tof_no_return == 'missing':
      observed &= ~no_return
    else:
      values[no_return] = tof_far_value
  values[~observed] = np.nan
  return values, observed
