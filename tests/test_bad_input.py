"""Bad input to the data sources: every case raises a clear error or is handled and counted.

Each error names the file, the column or field, the offending row or value and the fix.
Related checks live next to their source: tests/test_cmi.py (zero-byte and header-only
files, the cut-off last row, repeated counters within a frame, infinite values),
tests/test_streams.py (missing and empty stream files) and
tests/test_phase4.py::test_config_rejects_small_queue (contrastive.queue_size against
batch_size).
"""

import logging
import math
import os

import jax
import numpy as np
import polars as pl
import pytest

from imputer import cmi
from imputer import features
from imputer import streams
from imputer import synthetic
from imputer import train
from tests import helpers
from tests.test_cmi import cmi_frame
from tests.test_streams import PULSE_ROWS, WRAPPED_MOTION_ROWS, motion_spec, pulse_spec
from tests.test_streams import write_csv, write_motion, write_pulse

NUM_COLUMNS = len(cmi.CMI_TRAIN_COLUMNS)  # 341 in the CMI train.csv.


def write_rows(path, frame: pl.DataFrame, edit=None) -> list[str]:
  """Write `frame` as CSV, apply `edit(lines)` to its lines (header first) and return them."""
  frame.write_csv(path)
  lines = path.read_text().splitlines()
  if edit is not None:
    edit(lines)
  path.write_text('\n'.join(lines) + '\n')
  return lines


def error_of(path, **options) -> str:
  with pytest.raises(ValueError) as error:
    cmi.load_cmi(str(path), **options)
  return str(error.value)


def small_frame(seed=0, **options) -> pl.DataFrame:
  settings = dict(num_subjects=2, sequences_per_subject=2, min_length=10, max_length=14,
                  imu_only_fraction=0.0, seed=seed)
  settings.update(options)
  return synthetic.generate_cmi_frame(**settings)


# Truncated CSV files: a short row anywhere, a blank line, quoted fields.


@pytest.mark.parametrize('imu_only', [False, True])
def test_short_row_inside_csv_raises(tmp_path, imu_only):
  # An IMU-only row ends in 320 empty ToF cells, so losing them changes no parsed value, and
  # only the count of fields shows the damage.
  rows = [{}, {}, {}, {}]
  if imu_only:
    rows[1] = {name: None for name in cmi.CMI_TOF_COLUMNS}
  path = tmp_path / 'train.csv'

  def cut_data_row_2(lines):
    lines[2] = lines[2].rsplit(',', 5)[0]

  write_rows(path, cmi_frame(rows), cut_data_row_2)
  message = error_of(path)

  assert message.startswith(f'{path}: data row 2 (line 3) has {NUM_COLUMNS - 5} of the '
                            f"header's {NUM_COLUMNS} fields")
  assert 'its absent fields would read as missing values' in message
  assert message.endswith('repair that row or export the file again.')


@pytest.mark.parametrize('blank_line, data_row', [(2, 2), (4, 4)])
def test_blank_line_raises(tmp_path, blank_line, data_row):
  # A CSV reader turns a blank line into a row of nulls, at the end of the file too.
  path = tmp_path / 'train.csv'
  write_rows(path, cmi_frame([{}, {}, {}]), lambda lines: lines.insert(blank_line, ''))

  message = error_of(path)

  assert message == (f'{path}: data row {data_row} (line {data_row + 1}) is blank, and a CSV '
                     'reader fills a blank line with empty values; delete the blank line.')


def test_quoted_commas_are_data(tmp_path):
  # The commas inside the quoted gesture are data, not separators.
  frame = cmi_frame([{'gesture': 'Wave, hello'}, {'gesture': 'Wave, hello'}])
  path = tmp_path / 'train.csv'
  lines = write_rows(path, frame)
  assert '"Wave, hello"' in lines[1]

  recording_set = cmi.load_cmi(str(path))

  assert recording_set.sequences[0].label == 'Wave, hello'
  assert recording_set.sequences[0].length == 2


def test_short_row_in_quoted_file_raises(tmp_path):
  frame = cmi_frame([{'gesture': 'Wave, hello'}] * 3)
  path = tmp_path / 'train.csv'
  write_rows(path, frame, lambda lines: lines.__setitem__(2, lines[2].rsplit(',', 1)[0]))

  message = error_of(path)

  assert message.startswith(f'{path}: data row 2 (line 3) has {NUM_COLUMNS - 1} of the '
                            f"header's {NUM_COLUMNS} fields")


def test_short_row_in_stream_file_raises(tmp_path):
  write_motion(tmp_path / 'a', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'a', PULSE_ROWS)
  path = tmp_path / 'a' / 'motion.csv'
  lines = path.read_text().splitlines()
  lines[3] = '1500,4.5'  # Data row 3 without its y and label fields.
  path.write_text('\n'.join(lines) + '\n')

  with pytest.raises(ValueError) as error:
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  assert str(error.value).startswith(
      f"{path}: data row 3 (line 4) has 2 of the header's 4 fields")


# Text in numeric columns.


@pytest.mark.parametrize('column, text', [
    ('thm_3', 'warm'), ('tof_2_v17', '12a'), ('sequence_counter', 'three')])
def test_text_in_numeric_column_raises(tmp_path, column, text):
  frame = cmi_frame([{}, {}, {}]).with_columns(pl.col(column).cast(pl.String))
  frame = frame.with_columns(
      pl.when(pl.int_range(pl.len()) == 2).then(pl.lit(text)).otherwise(pl.col(column))
      .alias(column))
  path = tmp_path / 'train.csv'
  frame.write_csv(path)

  message = error_of(path)

  assert message.startswith(f'CMI file {path}: column {column!r} contains the non-numeric '
                            f'value {text!r} at data row 3')
  if column == 'sequence_counter':
    # A counter cannot be missing, so its fix is a position, not an empty cell.
    assert message.endswith('write the whole-number position of the row in its sequence '
                            '(0, 1, 2, ...).')
  else:
    assert message.endswith('correct the value, or leave the cell empty or write NaN to mark '
                            'it missing.')


# Missing required columns.


@pytest.mark.parametrize('suffix', ['.csv', '.parquet'])
def test_missing_columns_name_file_and_fix(tmp_path, suffix):
  tof_5 = [f'tof_5_v{pixel}' for pixel in range(64)]
  frame = cmi_frame([{}, {}]).drop(['subject', 'rot_w'] + tof_5)
  path = tmp_path / f'train{suffix}'
  if suffix == '.csv':
    frame.write_csv(path)
  else:
    frame.write_parquet(path)

  message = error_of(path)

  assert message.startswith(f'CMI file {path}: missing 66 required column(s): subject, rot_w, '
                            'tof_5_v0..tof_5_v63.')
  assert message.endswith('check that the file is a CMI train.csv or test.csv export with its '
                          'header row.')


# Duplicated rows, repeated and unsorted sequence_counter.


def test_exact_duplicate_row_names_both_rows(tmp_path):
  path = tmp_path / 'train.csv'
  write_rows(path, cmi_frame([{}, {}, {}]), lambda lines: lines.append(lines[2]))

  message = error_of(path)

  assert message == (f"CMI file {path}: sequence 'SEQ_A' has sequence_counter 1 twice (data "
                     'rows 2 and 4), and the two rows are identical, so one is a copy of the '
                     'other; remove one of them.')


def test_unsorted_counters_are_sorted(tmp_path):
  frame = small_frame(seed=4)
  shuffled = frame.sample(fraction=1.0, shuffle=True, seed=1)
  assert shuffled['sequence_counter'].to_list() != frame['sequence_counter'].to_list()
  path = tmp_path / 'train.csv'
  shuffled.write_csv(path)

  recording_set = cmi.load_cmi(str(path))

  first_seen = list(dict.fromkeys(shuffled['sequence_id'].to_list()))
  assert [s.sequence_id for s in recording_set.sequences] == first_seen
  for sequence in recording_set.sequences:
    rows = shuffled.filter(pl.col('sequence_id') == sequence.sequence_id)
    by_counter = np.argsort(rows['sequence_counter'].to_numpy())
    acc = rows.select(['acc_x', 'acc_y', 'acc_z']).to_numpy()[by_counter]
    thm = rows.select(list(features.CMI_THM_COLUMNS)).to_numpy()[by_counter]
    np.testing.assert_array_equal(sequence.raw['imu'][:, :3], acc)
    np.testing.assert_array_equal(sequence.raw['thm'], thm)
  assert set(recording_set.excluded) == {'tof: no-return (-1) pixel values, treated as missing'}


def test_huge_counter_span_raises(tmp_path):
  counters = pl.Series('sequence_counter', [0.0, 1e30, 1.0])
  path = tmp_path / 'train.csv'
  cmi_frame([{}, {}, {}]).with_columns(counters).write_csv(path)

  message = error_of(path)

  assert message == (f"CMI file {path}: sequence 'SEQ_A' has sequence_counter values from 0 "
                     '(data row 1) to 1e+30 (data row 2), a span of 1e+30 timesteps; every '
                     'skipped counter becomes a missing row, and a sequence may span at most '
                     '100000 timesteps. Correct the counter values, or give separate recordings '
                     'their own sequence_ids.')


def test_largest_counter_span_loads():
  rows = [{'sequence_counter': 5}, {'sequence_counter': 5 + cmi.MAX_SEQUENCE_SPAN - 1}]
  recording_set = cmi.from_cmi_frame(cmi_frame(rows), 'test table')

  assert recording_set.sequences[0].length == cmi.MAX_SEQUENCE_SPAN
  key = 'rows missing from a sequence_counter gap, inserted as missing values'
  assert recording_set.excluded[key] == cmi.MAX_SEQUENCE_SPAN - 2


# A sequence of one row.


def with_one_row_sequences(frame: pl.DataFrame) -> pl.DataFrame:
  """Append, for every sequence, a copy of its first row as a sequence of its own."""
  firsts = frame.group_by('sequence_id', maintain_order=True).first()
  firsts = firsts.with_columns(pl.col('sequence_id') + '_ONE').select(frame.columns)
  return pl.concat([frame, firsts])


def test_one_row_sequence_loads(tmp_path):
  frame = small_frame()
  path = tmp_path / 'train.csv'
  with_one_row_sequences(frame).write_csv(path)

  recording_set = cmi.load_cmi(str(path))

  single = [s for s in recording_set.sequences if s.sequence_id.endswith('_ONE')]
  assert len(single) == 4
  first_row = frame.filter(pl.col('sequence_id') == 'SEQ_000001').head(1)
  assert single[0].length == 1
  np.testing.assert_array_equal(single[0].raw['imu'][0],
                                first_row.select(list(features.CMI_IMU_COLUMNS)).row(0))
  assert single[0].observed['imu'].all()


def test_one_row_sequence_trains(tmp_path):
  frame = synthetic.generate_cmi_frame(num_subjects=6, sequences_per_subject=2, min_length=20,
                                       max_length=30, imu_only_fraction=0.0, seed=2)
  path = tmp_path / 'train.csv'
  with_one_row_sequences(frame).write_csv(path)
  config = helpers.tiny_config(**{'data.path': str(path)})

  data = train.prepare_data(config)

  # Each one-row sequence of a training subject is one window with a single valid timestep.
  one_row = np.flatnonzero(data.train.index[:, 2] == 1)
  train_ids = [s.sequence_id for s in data.sequences['train']]
  assert len(one_row) == sum(i.endswith('_ONE') for i in train_ids) > 0
  expected_valid = np.zeros(config.data.window, bool)
  expected_valid[0] = True
  for row in one_row:
    np.testing.assert_array_equal(data.train.batch['valid'][row], expected_valid)
  # A rate reads the previous timestep, which a one-row sequence lacks.
  thm_rate = list(data.target_layouts[0].feature_set.names).index('thm_1_rate')
  assert not data.train.batch['observed']['thm'][one_row, 0, thm_rate].any()

  # A batch of nothing but one-row windows still gives a finite loss and finite parameters.
  steps, _ = train.make_steps(config, data)
  init, example = train.state_initializer(steps, data)
  state = jax.jit(init)(jax.random.PRNGKey(0), example)
  batch = data.train.take(np.resize(one_row, config.batch_size))
  state, metrics = jax.jit(steps.train_step)(state, batch)
  assert math.isfinite(float(metrics['loss']))
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))


# Target groups without any observed value.


@pytest.mark.parametrize('empty_groups, named', [
    (('thm', 'tof'), 'thm (thm_1..thm_5), tof (tof_1_v0..tof_5_v63)'),
    (('tof',), 'tof (tof_1_v0..tof_5_v63)'),
])
def test_unobserved_target_group_stops_training(tmp_path, empty_groups, named):
  columns = {'thm': features.CMI_THM_COLUMNS, 'tof': cmi.CMI_TOF_COLUMNS}
  frame = synthetic.generate_cmi_frame(num_subjects=6, sequences_per_subject=2, min_length=20,
                                       max_length=30, imu_only_fraction=0.0, seed=2)
  emptied = [name for group in empty_groups for name in columns[group]]
  frame = frame.with_columns(pl.lit(None, dtype=frame.schema[name]).alias(name)
                             for name in emptied)
  path = tmp_path / 'train.csv'
  frame.write_csv(path)
  config = helpers.tiny_config(**{'data.path': str(path)})

  with pytest.raises(ValueError) as error:
    train.prepare_data(config)

  assert str(error.value) == (
      f'CMI file {path}: no sequence has an observed value of the target group(s) {named}, so '
      'there is nothing to learn or score for them; check those columns, or use data in which '
      'they are recorded.')


# Zero or partly missing quaternions.


def test_unusable_quaternions_counted(tmp_path):
  zero = {'rot_w': 0.0, 'rot_x': 0.0, 'rot_y': 0.0, 'rot_z': 0.0}
  rows = [
      {},                                                       # Usable.
      zero,                                                     # Zero: counted.
      {**zero, 'rot_w': -0.0},                                  # Negative zero: counted.
      {'rot_y': None},                                          # Partly empty: counted.
      {'rot_x': math.nan, 'rot_z': math.nan},                   # Partly NaN: counted.
      {name: None for name in zero},                            # All empty: plain missing.
      {'rot_w': 0.5, 'rot_x': 0.5, 'rot_y': 0.5, 'rot_z': 0.5},  # Usable.
  ]
  path = tmp_path / 'train.csv'
  cmi_frame(rows).write_csv(path)

  recording_set = cmi.load_cmi(str(path))

  observed = recording_set.sequences[0].observed['imu']
  expected_rotation = np.array([True, False, False, False, False, False, True])
  np.testing.assert_array_equal(observed[:, 3:], np.repeat(expected_rotation[:, None], 4, 1))
  assert observed[:, :3].all()  # The accelerometer stays observed.
  assert np.isnan(recording_set.sequences[0].raw['imu'][~expected_rotation, 3:]).all()
  assert dict(recording_set.excluded) == {
      'imu: rows with a zero quaternion, treated as missing orientation': 2,
      'imu: rows with a partly missing quaternion, treated as missing orientation': 2,
  }


# Impossible magnitudes: ±1e30 and ±inf.


@pytest.mark.parametrize('column, value', [
    ('acc_x', 1e30), ('rot_z', -1e30), ('thm_4', 1e30), ('tof_3_v9', 1e30), ('acc_y', 2e6)])
def test_impossible_value_raises(tmp_path, column, value):
  path = tmp_path / 'train.csv'
  cmi_frame([{}, {column: value}]).write_csv(path)

  message = error_of(path)

  assert message == (f'CMI file {path}: column {column!r} contains the value {value:g} at data '
                     'row 2, beyond ±1e+06, which no sensor reading reaches, so it is a fill '
                     'value or a corrupted cell; correct it, or leave the cell empty or write NaN '
                     'to mark it missing.')


def test_value_at_magnitude_bound_loads():
  bound = cmi.MAX_SENSOR_MAGNITUDE
  recording_set = cmi.from_cmi_frame(cmi_frame([{'acc_x': -bound, 'thm_1': bound}]), 'table')

  assert recording_set.sequences[0].raw['imu'][0, 0] == -bound
  assert recording_set.sequences[0].raw['thm'][0, 0] == bound


# Parquet column types.


def write_parquet(tmp_path, frame) -> str:
  path = tmp_path / 'train.parquet'
  frame.write_parquet(path)
  return str(path)


def test_parquet_integer_sensor_columns_load(tmp_path):
  frame = cmi_frame([{'acc_x': 3.0, 'thm_2': 31.0, 'tof_4_v1': 200.0}, {'rot_w': 1.0}])
  typed = frame.with_columns(pl.col('acc_x').cast(pl.Int16), pl.col('thm_2').cast(pl.Int32),
                             pl.col(cmi.CMI_TOF_COLUMNS).cast(pl.UInt8),
                             pl.col('sequence_counter').cast(pl.UInt32))

  loaded = cmi.load_cmi(write_parquet(tmp_path, typed)).sequences[0]
  expected = cmi.from_cmi_frame(frame, 'floats').sequences[0]

  for name in ('imu', 'thm', 'tof'):
    assert loaded.raw[name].dtype == np.float64
    np.testing.assert_array_equal(loaded.raw[name], expected.raw[name])
  assert loaded.raw['imu'][0, 0] == 3.0
  assert loaded.raw['tof'][0, cmi.CMI_TOF_COLUMNS.index('tof_4_v1')] == 200.0


def test_parquet_numeric_text_loads(tmp_path):
  frame = cmi_frame([{'thm_5': 29.5}, {'thm_5': None}, {'thm_5': 30.25}])
  as_text = frame.with_columns(pl.col('thm_5').cast(pl.String))

  loaded = cmi.load_cmi(write_parquet(tmp_path, as_text)).sequences[0]

  np.testing.assert_array_equal(loaded.raw['thm'][:, 4], [29.5, np.nan, 30.25])
  np.testing.assert_array_equal(loaded.observed['thm'][:, 4], [True, False, True])


@pytest.mark.parametrize('column, series, dtype', [
    ('acc_z', pl.Series('acc_z', [True, False]), 'Boolean'),
    ('thm_1', pl.Series('thm_1', ['2024-05-01', '2024-05-02']).str.to_date(), 'Date'),
    ('tof_2_v3', pl.Series('tof_2_v3', ['a', 'b'], dtype=pl.Categorical), 'Categorical'),
])
def test_parquet_non_numeric_type_raises(tmp_path, column, series, dtype):
  path = write_parquet(tmp_path, cmi_frame([{}, {}]).with_columns(series))

  message = error_of(path)

  assert message == (f'CMI file {path}: column {column!r} has the type {dtype}, expected '
                     'numbers; convert it to a numeric column.')


def test_parquet_categorical_and_integer_ids(tmp_path):
  frame = cmi_frame([
      {'sequence_id': 'SEQ_B', 'subject': '17'}, {'sequence_id': 'SEQ_A', 'subject': '4'},
      {'sequence_id': 'SEQ_B', 'subject': '17', 'sequence_counter': 1}])
  typed = frame.with_columns(pl.col('sequence_id').cast(pl.Categorical),
                             pl.col('subject').cast(pl.Int64))

  recording_set = cmi.load_cmi(write_parquet(tmp_path, typed))

  assert [s.sequence_id for s in recording_set.sequences] == ['SEQ_B', 'SEQ_A']
  assert [s.subject for s in recording_set.sequences] == ['17', '4']
  assert recording_set.subjects == ['17', '4']
  assert [s.length for s in recording_set.sequences] == [2, 1]


# A stream folder with a missing sensor file.


def test_missing_target_file_logged(tmp_path, caplog):
  write_motion(tmp_path / 'rec-1', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'rec-1', PULSE_ROWS)
  write_motion(tmp_path / 'rec-2', WRAPPED_MOTION_ROWS)

  with caplog.at_level(logging.WARNING):
    recording_set = streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  path = os.path.join(tmp_path, 'rec-2', 'pulse.csv')
  warnings = [record.getMessage() for record in caplog.records
              if record.levelno == logging.WARNING]
  assert warnings == [f"Recording 'rec-2' in {tmp_path}: {path} has no data (file missing), so "
                      "target group 'pulse' is missing in the whole recording."]
  assert recording_set.excluded['pulse: recordings without target data (file missing)'] == 1
  second = [s for s in recording_set.sequences if s.subject == 'rec-2']
  assert not any(s.observed['pulse'].any() for s in second)


# Config fields checked against the data.


def test_window_beyond_longest_sequence_raises(tmp_path):
  frame = synthetic.generate_cmi_frame(num_subjects=6, sequences_per_subject=2, min_length=20,
                                       max_length=30, imu_only_fraction=0.0, seed=2)
  longest = int(frame.group_by('sequence_id').len()['len'].max())
  path = tmp_path / 'train.csv'
  frame.write_csv(path)

  too_long = helpers.tiny_config(**{'data.path': str(path), 'data.window': longest + 1})
  with pytest.raises(ValueError) as error:
    train.prepare_data(too_long)

  assert str(error.value) == (
      f'data.window={longest + 1} is invalid: the longest sequence of CMI file {path} has '
      f'{longest} timesteps, so set --config.data.window to at most {longest}, and '
      'data.train_stride to at most the new window.')
  fits = helpers.tiny_config(**{'data.path': str(path), 'data.window': longest})
  assert train.prepare_data(fits).train.batch['valid'].shape[1] == longest
