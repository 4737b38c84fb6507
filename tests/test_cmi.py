"""Tests for the CMI table source: observed masks, ordering, labels, files and errors."""

import os
import math

import numpy as np
import polars as pl
import pytest

from imputer import cmi, features

NAN = math.nan
SENSOR_DEFAULTS = {
    'acc_x': 0.0, 'acc_y': 0.0, 'acc_z': 9.81, 'rot_w': 1.0, 'rot_x': 0.0, 'rot_y': 0.0,
    'rot_z': 0.0, **{name: 30.0 for name in features.CMI_THM_COLUMNS},
    **{name: 100.0 for name in cmi.CMI_TOF_COLUMNS}}


def cmi_frame(rows: list[dict]) -> pl.DataFrame:
  """Build a frame with every CMI train.csv column, in order, one row per dict.

  Each dict overrides the defaults of its row: sequence 'SEQ_A', the row's position as counter,
  subject 'SUBJ_1', gesture 'Wave hello', a level resting IMU, 30 °C and 100 mm everywhere.
  None becomes a null and math.nan a NaN.
  """
  columns = {}
  for name in cmi.CMI_TRAIN_COLUMNS:
    values = []
    for position, row in enumerate(rows):
      defaults = {
          'row_id': f'ROW_{position}', 'sequence_type': 'Non-Target', 'sequence_id': 'SEQ_A',
          'sequence_counter': position, 'subject': 'SUBJ_1', 'orientation': 'Seated Straight',
          'behavior': 'Performs gesture', 'phase': 'Gesture', 'gesture': 'Wave hello',
          **SENSOR_DEFAULTS}
      values.append(row.get(name, defaults[name]))
    if name in cmi.CMI_SENSOR_COLUMNS:
      columns[name] = pl.Series(name, values, dtype=pl.Float64)
    elif name == 'sequence_counter':
      columns[name] = pl.Series(name, values, dtype=pl.Int64)
    else:
      columns[name] = pl.Series(name, values, dtype=pl.String)
  return pl.DataFrame(list(columns.values()))


def load(frame, **options):
  return cmi.from_cmi_frame(frame, 'test table', **options)


def test_column_names_and_groups():
  assert len(cmi.CMI_TOF_COLUMNS) == 320
  assert cmi.CMI_TOF_COLUMNS[:2] == ('tof_1_v0', 'tof_1_v1')
  assert cmi.CMI_TOF_COLUMNS[64] == 'tof_2_v0'
  assert cmi.CMI_TOF_COLUMNS[-1] == 'tof_5_v63'
  assert len(cmi.CMI_TRAIN_COLUMNS) == 9 + 7 + 5 + 320

  (imu,), (thm, tof) = cmi.cmi_groups()
  assert imu.columns == features.CMI_IMU_COLUMNS
  assert imu.sensors == ('acc', 'rot')
  assert imu.sensor_of_column == (0, 0, 0, 1, 1, 1, 1)
  assert imu.features == 'cmi_imu'
  assert thm.sensors == ('thm_1', 'thm_2', 'thm_3', 'thm_4', 'thm_5')
  assert thm.sensor_of_column == (0, 1, 2, 3, 4)
  assert thm.features == 'cmi_thm'
  assert tof.sensors == ('tof_1', 'tof_2', 'tof_3', 'tof_4', 'tof_5')
  assert tof.sensor_of_column[63] == 0
  assert tof.sensor_of_column[64] == 1
  assert tof.sensor_of_column[319] == 4
  assert tof.features == 'raw'


def test_accelerometer_mask_null_and_nan():
  frame = cmi_frame([{}, {'acc_x': None}, {'acc_y': NAN, 'acc_z': 9.5}])
  sequence = load(frame).sequences[0]

  observed = sequence.observed['imu'][:, :3]
  np.testing.assert_array_equal(observed, [[1, 1, 1], [0, 1, 1], [1, 0, 1]])
  assert np.isnan(sequence.raw['imu'][1, 0])
  assert np.isnan(sequence.raw['imu'][2, 1])
  assert sequence.raw['imu'][2, 2] == 9.5
  assert sequence.raw['imu'].dtype == np.float64
  assert sequence.observed['imu'].dtype == bool


def test_quaternion_zero_and_partial_nan():
  frame = cmi_frame([
      {'rot_w': 0.5, 'rot_x': 0.5, 'rot_y': 0.5, 'rot_z': 0.5},
      {'rot_w': 0.0, 'rot_x': 0.0, 'rot_y': 0.0, 'rot_z': 0.0},
      {'rot_x': NAN},
      {'rot_w': None},
  ])
  sequence = load(frame).sequences[0]

  rot_observed = sequence.observed['imu'][:, 3:]
  np.testing.assert_array_equal(rot_observed.all(axis=1), [True, False, False, False])
  np.testing.assert_array_equal(rot_observed.any(axis=1), [True, False, False, False])
  np.testing.assert_array_equal(sequence.raw['imu'][0, 3:], [0.5, 0.5, 0.5, 0.5])
  assert np.isnan(sequence.raw['imu'][1:, 3:]).all()
  # The accelerometer stays observed when only the quaternion is missing.
  assert sequence.observed['imu'][:, :3].all()


def test_thermopile_null_and_nan_are_missing():
  frame = cmi_frame([{'thm_1': None, 'thm_2': NAN, 'thm_3': 31.25}])
  sequence = load(frame).sequences[0]

  np.testing.assert_array_equal(sequence.observed['thm'][0], [False, False, True, True, True])
  assert sequence.raw['thm'][0, 2] == 31.25
  assert np.isnan(sequence.raw['thm'][0, :2]).all()


def test_tof_no_return_missing_mode():
  frame = cmi_frame([{'tof_1_v0': -1.0, 'tof_1_v1': None, 'tof_1_v2': NAN, 'tof_1_v3': 0.0}])
  sequence = load(frame, tof_no_return='missing').sequences[0]

  np.testing.assert_array_equal(sequence.observed['tof'][0, :5], [False, False, False, True, True])
  assert np.isnan(sequence.raw['tof'][0, :3]).all()
  assert sequence.raw['tof'][0, 3] == 0.0
  assert sequence.observed['tof'][0, 4:].all()


def test_tof_no_return_far_mode():
  frame = cmi_frame([{'tof_2_v5': -1.0, 'tof_2_v6': None, 'tof_2_v7': NAN}])
  sequence = load(frame, tof_no_return='far', tof_far_value=300.0).sequences[0]

  column = cmi.CMI_TOF_COLUMNS.index('tof_2_v5')
  assert sequence.observed['tof'][0, column]
  assert sequence.raw['tof'][0, column] == 300.0
  assert not sequence.observed['tof'][0, column + 1]
  assert not sequence.observed['tof'][0, column + 2]
  assert np.isnan(sequence.raw['tof'][0, column + 1:column + 3]).all()


def test_tof_other_negative_value_raises():
  frame = cmi_frame([{}, {'tof_4_v10': -3.0}])
  with pytest.raises(ValueError) as error:
    load(frame)
  message = str(error.value)
  assert 'test table' in message
  assert "'tof_4_v10'" in message
  assert 'data row 2' in message
  assert '-3' in message


def test_unknown_tof_no_return_lists_choices():
  with pytest.raises(ValueError, match="'missing', 'far'"):
    load(cmi_frame([{}]), tof_no_return='zero')


def test_rows_sorted_by_counter():
  frame = cmi_frame([
      {'sequence_counter': 2, 'acc_x': 2.0},
      {'sequence_counter': 0, 'acc_x': 0.0},
      {'sequence_counter': 3, 'acc_x': 3.0},
      {'sequence_counter': 1, 'acc_x': 1.0},
  ])
  sequence = load(frame).sequences[0]

  np.testing.assert_array_equal(sequence.raw['imu'][:, 0], [0.0, 1.0, 2.0, 3.0])
  assert sequence.length == 4


def test_sequences_keep_first_appearance_order():
  frame = cmi_frame([
      {'sequence_id': 'SEQ_B', 'sequence_counter': 1, 'acc_x': 21.0, 'subject': 'SUBJ_2'},
      {'sequence_id': 'SEQ_A', 'sequence_counter': 0, 'acc_x': 10.0},
      {'sequence_id': 'SEQ_B', 'sequence_counter': 0, 'acc_x': 20.0, 'subject': 'SUBJ_2'},
      {'sequence_id': 'SEQ_A', 'sequence_counter': 1, 'acc_x': 11.0},
      {'sequence_id': 'SEQ_C', 'sequence_counter': 0, 'acc_x': 30.0},
  ])
  recordings = load(frame)

  assert [s.sequence_id for s in recordings.sequences] == ['SEQ_B', 'SEQ_A', 'SEQ_C']
  assert [s.subject for s in recordings.sequences] == ['SUBJ_2', 'SUBJ_1', 'SUBJ_1']
  np.testing.assert_array_equal(recordings.sequences[0].raw['imu'][:, 0], [20.0, 21.0])
  np.testing.assert_array_equal(recordings.sequences[1].raw['imu'][:, 0], [10.0, 11.0])
  assert recordings.sequences[2].length == 1
  assert recordings.subjects == ['SUBJ_1', 'SUBJ_2']
  assert recordings.source == 'test table'
  assert not recordings.excluded
  assert recordings.target_names == ('thm', 'tof')


def test_label_from_gesture_column():
  frame = cmi_frame([
      {'sequence_id': 'SEQ_A', 'gesture': 'Cheek - pinch skin'},
      {'sequence_id': 'SEQ_B', 'gesture': None},
  ])
  recordings = load(frame)

  assert recordings.sequences[0].label == 'Cheek - pinch skin'
  assert recordings.sequences[1].label is None


def test_label_none_without_label_columns():
  frame = cmi_frame([{}, {}]).drop(list(cmi.CMI_LABEL_COLUMNS) + ['row_id'])
  recordings = load(frame)

  assert recordings.sequences[0].label is None
  assert recordings.sequences[0].length == 2


def test_gesture_changing_within_sequence_raises():
  frame = cmi_frame([{'gesture': 'Wave hello'}, {'gesture': 'Text on phone'}])
  with pytest.raises(ValueError, match="more than one gesture: 'Wave hello' at data row 1"):
    load(frame)


def test_subject_changing_within_sequence_raises():
  frame = cmi_frame([{'subject': 'SUBJ_1'}, {'subject': 'SUBJ_9'}])
  with pytest.raises(ValueError) as error:
    load(frame)
  message = str(error.value)
  assert "sequence 'SEQ_A' has more than one subject" in message
  assert "'SUBJ_9' at data row 2" in message


def test_duplicate_counter_raises():
  frame = cmi_frame([{'sequence_counter': 0}, {'sequence_counter': 1, 'acc_x': 0.5},
                     {'sequence_counter': 1, 'acc_x': 0.75, 'thm_2': 31.0}])
  with pytest.raises(ValueError) as error:
    load(frame)
  # cmi_frame numbers row_id by position, so row_id differs as well.
  assert str(error.value) == (
      "test table: sequence 'SEQ_A' has sequence_counter 1 twice (data rows 2 and 3), and the "
      'rows differ in row_id, acc_x, thm_2; every row of a sequence needs its own counter, so '
      'remove the wrong row or correct its counter.')


def test_missing_counter_raises():
  frame = cmi_frame([{}, {'sequence_counter': None}])
  with pytest.raises(ValueError, match="'sequence_counter' is missing or not finite at data row 2"):
    load(frame)


def test_missing_sequence_id_raises():
  frame = cmi_frame([{'sequence_id': None}])
  with pytest.raises(ValueError, match="'sequence_id' is empty at data row 1"):
    load(frame)


def test_missing_columns_listed_and_summarized():
  tof_3 = [f'tof_3_v{pixel}' for pixel in range(64)]
  frame = cmi_frame([{}]).drop(['subject', 'thm_2'] + tof_3)
  with pytest.raises(ValueError) as error:
    load(frame)
  message = str(error.value)
  assert message.startswith('test table: missing 66 required column(s): subject, thm_2, '
                            'tof_3_v0..tof_3_v63.')
  assert 'tof_3_v5' not in message


def test_non_numeric_value_reports_column_row_value():
  frame = cmi_frame([{}, {}, {}]).with_columns(
      pl.Series('acc_x', ['1.5', '', 'abc'], dtype=pl.String))
  with pytest.raises(ValueError) as error:
    load(frame)
  message = str(error.value)
  assert 'test table' in message
  assert "'acc_x'" in message
  assert 'data row 3' in message
  assert "'abc'" in message


def test_text_nan_and_empty_cells_are_missing():
  frame = cmi_frame([{}, {}, {}, {}]).with_columns(
      pl.Series('thm_1', ['NaN', 'nan', '', ' 32.5 '], dtype=pl.String))
  sequence = load(frame).sequences[0]

  np.testing.assert_array_equal(sequence.observed['thm'][:, 0], [False, False, False, True])
  assert sequence.raw['thm'][3, 0] == 32.5


def test_non_numeric_column_type_raises():
  frame = cmi_frame([{}]).with_columns(pl.Series('thm_4', [True]))
  with pytest.raises(ValueError, match="column 'thm_4' has the type Boolean"):
    load(frame)


def test_integer_tof_columns_accepted():
  frame = cmi_frame([{'tof_1_v0': -1.0}, {}])
  frame = frame.with_columns(pl.col(cmi.CMI_TOF_COLUMNS).cast(pl.Int64))
  sequence = load(frame).sequences[0]

  assert not sequence.observed['tof'][0, 0]
  assert sequence.raw['tof'].dtype == np.float64
  assert sequence.raw['tof'][1, 0] == 100.0


def example_frame() -> pl.DataFrame:
  """Two sequences with every kind of missing value, ToF as integers like the real file."""
  frame = cmi_frame([
      {'sequence_id': 'SEQ_7', 'sequence_counter': 1, 'acc_x': 0.25, 'thm_1': None},
      {'sequence_id': 'SEQ_7', 'sequence_counter': 0, 'rot_y': NAN, 'tof_5_v63': -1.0},
      {'sequence_id': 'SEQ_3', 'sequence_counter': 0, 'subject': 'SUBJ_2', 'tof_2_v0': None,
       'thm_5': 28.125},
  ])
  return frame.with_columns(pl.col(cmi.CMI_TOF_COLUMNS).cast(pl.Int64))


def assert_same_recordings(actual, expected):
  assert [s.sequence_id for s in actual.sequences] == [s.sequence_id for s in expected.sequences]
  for got, want in zip(actual.sequences, expected.sequences):
    assert got.subject == want.subject
    assert got.label == want.label
    for name in want.raw:
      np.testing.assert_array_equal(got.observed[name], want.observed[name])
      np.testing.assert_array_equal(got.raw[name], want.raw[name])


def test_csv_round_trip(tmp_path):
  frame = example_frame()
  path = tmp_path / 'train.csv'
  frame.write_csv(path)
  recordings = cmi.load_cmi(str(path))

  assert recordings.source == f'CMI file {path}'
  assert_same_recordings(recordings, load(frame))
  assert not recordings.sequences[0].observed['imu'][0, 3:].any()
  assert not recordings.sequences[0].observed['tof'][0, 319]


def test_parquet_round_trip(tmp_path):
  frame = example_frame()
  path = tmp_path / 'train.parquet'
  frame.write_parquet(path)

  assert_same_recordings(cmi.load_cmi(str(path)), load(frame))


def test_csv_test_schema_without_labels(tmp_path):
  frame = example_frame().drop(list(cmi.CMI_LABEL_COLUMNS))
  path = tmp_path / 'test.csv'
  frame.write_csv(path)
  recordings = cmi.load_cmi(str(path), tof_no_return='far')

  assert [s.label for s in recordings.sequences] == [None, None]
  assert recordings.sequences[0].raw['tof'][0, 319] == 255.0


def test_csv_non_numeric_cell_reports_row(tmp_path):
  frame = example_frame().with_columns(pl.col('acc_y').cast(pl.String))
  frame = frame.with_columns(pl.Series('acc_y', ['0.0', '0.0', 'abc']))
  path = tmp_path / 'bad.csv'
  frame.write_csv(path)
  with pytest.raises(ValueError) as error:
    cmi.load_cmi(str(path))
  message = str(error.value)
  assert str(path) in message
  assert "'acc_y'" in message
  assert 'data row 3' in message
  assert "'abc'" in message


def test_csv_all_empty_sensor_column(tmp_path):
  frame = example_frame().with_columns(pl.lit(None, dtype=pl.Float64).alias('thm_3'))
  path = tmp_path / 'empty_thm.csv'
  frame.write_csv(path)
  recordings = cmi.load_cmi(str(path))

  assert not any(s.observed['thm'][:, 2].any() for s in recordings.sequences)


def test_missing_file_raises(tmp_path):
  path = tmp_path / 'absent.csv'
  with pytest.raises(ValueError, match='file not found'):
    cmi.read_table(str(path))


def test_unknown_suffix_raises(tmp_path):
  path = tmp_path / 'train.txt'
  path.write_text('sequence_id\nSEQ_1\n')
  with pytest.raises(ValueError, match=r"unknown file type '\.txt'; give a \.csv or \.parquet"):
    cmi.read_table(str(path))


@pytest.mark.parametrize('suffix', ['.csv', '.parquet'])
def test_zero_byte_file_raises(tmp_path, suffix):
  path = tmp_path / f'train{suffix}'
  path.write_bytes(b'')
  with pytest.raises(ValueError) as error:
    cmi.read_table(str(path))
  assert str(error.value) == (
      f'{path}: the file is empty; write the table with its header row and data rows.')


def test_blank_csv_raises(tmp_path):
  path = tmp_path / 'blank.csv'
  path.write_text('\n\n')
  with pytest.raises(ValueError, match='header'):
    cmi.read_table(str(path))


@pytest.mark.parametrize('suffix', ['.csv', '.parquet'])
def test_header_without_rows_raises(tmp_path, suffix):
  path = tmp_path / f'train{suffix}'
  empty = cmi_frame([{}]).head(0)
  if suffix == '.csv':
    empty.write_csv(path)
  else:
    empty.write_parquet(path)
  with pytest.raises(ValueError) as error:
    cmi.read_table(str(path))
  assert str(error.value) == (
      f'{path}: the table has a header but no data rows; check that the export wrote the rows.')


def test_empty_frame_raises():
  with pytest.raises(ValueError, match='test table: the table has no rows'):
    load(cmi_frame([{}]).head(0))


def test_malformed_csv_raises(tmp_path):
  path = tmp_path / 'broken.csv'
  path.write_text('sequence_id,sequence_counter\nSEQ_1,0\n"SEQ_2,1\n')
  with pytest.raises(ValueError) as error:
    cmi.read_table(str(path))
  assert str(path) in str(error.value)
  assert 'could not be parsed as CSV' in str(error.value)


def test_corrupt_parquet_raises(tmp_path):
  path = tmp_path / 'broken.parquet'
  path.write_bytes(b'not a parquet file at all')
  with pytest.raises(ValueError, match='could not be read as a parquet file'):
    cmi.read_table(str(path))


def test_unusable_readings_are_counted():
  frame = cmi_frame([
      {'rot_w': 0.0, 'rot_x': 0.0, 'rot_y': 0.0, 'rot_z': 0.0},
      {'rot_x': NAN},
      {'tof_1_v0': -1.0, 'tof_2_v5': -1.0},
      {},
  ])
  excluded = load(frame).excluded
  assert excluded['imu: rows with a zero quaternion, treated as missing orientation'] == 1
  assert excluded['imu: rows with a partly missing quaternion, treated as missing orientation'] == 1
  assert excluded['tof: no-return (-1) pixel values, treated as missing'] == 2
  assert 'tof: no-return (-1) pixel values, treated as missing' not in load(
      frame, tof_no_return='far').excluded


@pytest.mark.parametrize('column, value', [
    ('acc_z', math.inf), ('rot_x', -math.inf), ('thm_2', math.inf), ('tof_3_v7', math.inf)])
def test_infinite_value_raises(column, value):
  frame = cmi_frame([{}, {column: value}])
  with pytest.raises(ValueError) as error:
    load(frame)
  assert str(error.value) == (
      f'test table: column {column!r} contains the infinite value {value:g} at data row 2; '
      'correct it, or leave the cell empty or write NaN to mark it missing.')


def test_counter_gap_becomes_missing_rows():
  frame = cmi_frame([{'sequence_counter': 0, 'thm_1': 30.0},
                     {'sequence_counter': 1, 'thm_1': 31.0},
                     {'sequence_counter': 4, 'thm_1': 34.0}])
  recording_set = load(frame)
  sequence = recording_set.sequences[0]
  assert sequence.length == 5
  np.testing.assert_array_equal(sequence.observed['thm'][:, 0], [True, True, False, False, True])
  np.testing.assert_array_equal(sequence.observed['imu'].all(axis=1),
                                [True, True, False, False, True])
  assert sequence.raw['thm'][4, 0] == 34.0
  assert np.isnan(sequence.raw['thm'][2:4]).all()
  key = 'rows missing from a sequence_counter gap, inserted as missing values'
  assert recording_set.excluded[key] == 2


def test_fractional_counter_raises():
  frame = cmi_frame([{}, {}]).with_columns(
      pl.Series('sequence_counter', [0.0, 1.5], dtype=pl.Float64))
  with pytest.raises(ValueError, match=r"non-integer value 1.5 at data row 2"):
    load(frame)


def test_cut_off_csv_raises(tmp_path):
  path = tmp_path / 'train.csv'
  cmi_frame([{}, {}, {}]).write_csv(path)
  with open(path, 'rb+') as f:
    f.truncate(os.path.getsize(path) - 200)
  last_row = path.read_text().splitlines()[-1]
  fields = len(last_row.split(','))
  assert fields < len(cmi.CMI_TRAIN_COLUMNS)
  with pytest.raises(ValueError) as error:
    cmi.read_table(str(path))
  assert str(error.value) == (
      f"{path}: the last row has {fields} of the header's {len(cmi.CMI_TRAIN_COLUMNS)} fields "
      '(data row 3, line 4), so the file looks cut off; copy or export the complete file again.')
