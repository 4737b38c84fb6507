"""Tests for imputer.streams: reading, aligning and splitting per-sensor CSV streams."""

import math
import os

import ml_collections
import numpy as np
import polars as pl
import pytest

from configs import bfrb_watch
from imputer import features
from imputer import sources
from imputer import streams

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'bfrb_watch_slice')


def write_csv(path, header, rows):
  """Write a CSV file with `header` and `rows` (lists of values, None for an empty field)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lines = [','.join(header)]
  lines += [','.join('' if value is None else str(value) for value in row) for row in rows]
  with open(path, 'w') as handle:
    handle.write('\n'.join(lines) + '\n')


def motion_spec(**overrides):
  fields = dict(group='motion', file='motion.csv', columns=('x', 'y'), role='input',
                max_gap_ms=60.0)
  fields.update(overrides)
  return streams.StreamSpec(**fields)


def pulse_spec(**overrides):
  fields = dict(group='pulse', file='pulse.csv', columns=('hrv',), role='target',
                missing_values=(0.0,), max_gap_ms=150.0)
  fields.update(overrides)
  return streams.StreamSpec(**fields)


def write_motion(folder, rows):
  write_csv(os.path.join(folder, 'motion.csv'), ['timestamp', 'x', 'y', 'label'], rows)


def write_pulse(folder, rows):
  write_csv(os.path.join(folder, 'pulse.csv'), ['timestamp', 'hrv'], rows)


# Motion samples (timestamp ms, x, y), written wrapped around: the file starts mid-recording.
# 1320 ms appears twice, so x averages 2 and 4 to 3, and y is 5 because one row has no y.
WRAPPED_MOTION_ROWS = [
    [1400, 3.5, -3.5, 0], [1500, 4.5, -4.5, 0], [1700, 6.0, -6.0, 0], [1800, 7.0, -7.0, 0],
    [1000, 1.0, -1.0, 0], [1110, 2.0, -2.0, 0], [1190, 2.5, -2.5, 0], [1320, 2.0, None, 0],
    [1320, 4.0, 5.0, 0],
]
# Pulse at 4 Hz with another offset. A heart rate of 0 means no reading.
PULSE_ROWS = [[1030, 60.0], [1280, 0.0], [1530, 70.0], [1780, 75.0]]


def test_alignment_matches_hand_computation(tmp_path):
  write_motion(tmp_path / 'subject-a', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'subject-a', PULSE_ROWS)

  recording_set = streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  # Grid: latest start 1030 to earliest end 1780 at 100 ms, so 1030, 1130, ..., 1730.
  # Motion (max 60 ms): 1630 is 70 ms from 1700 and 130 ms from 1500, so it is missing.
  # Pulse (max 150 ms): 1230 and 1330 take the 0 at 1280, and 1430 takes 1530 (100 ms).
  nan = np.nan
  expected_motion = np.array([
      [1.0, -1.0], [2.0, -2.0], [2.5, -2.5], [3.0, 5.0], [3.5, -3.5], [4.5, -4.5],
      [nan, nan], [6.0, -6.0]])
  expected_pulse = np.array([[60.0], [60.0], [nan], [nan], [70.0], [70.0], [70.0], [75.0]])
  assert len(recording_set.sequences) == 1
  sequence = recording_set.sequences[0]
  np.testing.assert_array_equal(sequence.raw['motion'], expected_motion)
  np.testing.assert_array_equal(sequence.raw['pulse'], expected_pulse)
  np.testing.assert_array_equal(sequence.observed['motion'], ~np.isnan(expected_motion))
  np.testing.assert_array_equal(sequence.observed['pulse'], ~np.isnan(expected_pulse))
  assert sequence.raw['motion'].dtype == np.float64
  assert sequence.observed['motion'].dtype == bool


def test_alignment_records_layout_and_exclusions(tmp_path):
  write_motion(tmp_path / 'subject-a', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'subject-a', PULSE_ROWS)

  recording_set = streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  sequence = recording_set.sequences[0]
  assert sequence.sequence_id == 'subject-a/0'
  assert sequence.subject == 'subject-a'
  assert sequence.label is None
  assert [group.name for group in recording_set.input_groups] == ['motion']
  assert [group.name for group in recording_set.target_groups] == ['pulse']
  assert recording_set.input_groups[0].columns == ('x', 'y')
  assert recording_set.input_groups[0].sensors == ('motion',)
  assert recording_set.source == f'sensor streams in {tmp_path} (1 recordings at 10 Hz)'
  assert recording_set.excluded['motion: rows sharing a timestamp, averaged into one'] == 1
  # Motion samples at 1000 ms and 1800 ms lie outside the common span 1030..1780 ms.
  assert recording_set.excluded['motion: samples outside the time span that all streams cover'] == 2
  assert recording_set.excluded['pulse: samples outside the time span that all streams cover'] == 0


def test_grid_point_halfway_takes_earlier_sample(tmp_path):
  write_motion(tmp_path / 'a', [[0, 1.0, 1.0, 0], [100, 2.0, 2.0, 0], [200, 3.0, 3.0, 0]])
  write_pulse(tmp_path / 'a', [[50, 60.0], [150, 61.0]])

  recording_set = streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  # Grid 50, 150: each is 50 ms from two motion samples and takes the earlier one.
  np.testing.assert_array_equal(recording_set.sequences[0].raw['motion'][:, 0], [1.0, 2.0])


def write_gap_recording(folder):
  """Write streams with no sample between 2050 ms and 5000 ms, with values in seconds."""
  motion_times = list(range(0, 2001, 100)) + list(range(5000, 7001, 100))
  pulse_times = list(range(50, 2051, 100)) + list(range(5050, 6951, 100))
  write_motion(folder, [[t, t / 1000, -t / 1000, 0] for t in motion_times])
  write_pulse(folder, [[t, t / 1000] for t in pulse_times])


def test_long_gap_splits_recording(tmp_path):
  write_gap_recording(tmp_path / 'gap')
  specs = [motion_spec(), pulse_spec(max_gap_ms=60.0)]

  recording_set = streams.load_streams(str(tmp_path), specs, 10.0, split_gap_s=1.0)

  # Grid 50, 150, ..., 6950 ms. No value is observed at 2150..4850 (28 points, 2.8 s).
  assert [seq.sequence_id for seq in recording_set.sequences] == ['gap/0', 'gap/1']
  first, second = recording_set.sequences
  assert first.length == 21
  assert second.length == 21
  np.testing.assert_allclose(first.raw['motion'][:, 0], np.arange(21) * 0.1)
  np.testing.assert_allclose(first.raw['pulse'][:, 0], 0.05 + np.arange(21) * 0.1)
  # 4950 ms takes the motion sample at 5000 ms (50 ms away), but the nearest pulse sample
  # is 100 ms away, beyond 60 ms.
  np.testing.assert_allclose(second.raw['motion'][:, 0],
                             [5.0, 5.0] + list(5.1 + np.arange(19) * 0.1))
  np.testing.assert_allclose(second.raw['pulse'][:, 0],
                             [np.nan] + list(5.05 + np.arange(20) * 0.1))
  key = 'grid points in gaps longer than 1 s with no observed value'
  assert recording_set.excluded[key] == 28


def test_short_gap_stays_as_missing_rows(tmp_path):
  write_gap_recording(tmp_path / 'gap')
  specs = [motion_spec(), pulse_spec(max_gap_ms=60.0)]

  recording_set = streams.load_streams(str(tmp_path), specs, 10.0, split_gap_s=5.0)

  assert len(recording_set.sequences) == 1
  sequence = recording_set.sequences[0]
  assert sequence.length == 70
  empty = ~sequence.observed['motion'].any(axis=1) & ~sequence.observed['pulse'].any(axis=1)
  assert empty.sum() == 28
  assert np.flatnonzero(empty).tolist() == list(range(21, 49))


@pytest.mark.parametrize('split_gap_s, sequences', [(2.7, 2), (2.8, 1)])
def test_gap_splits_only_when_longer(tmp_path, split_gap_s, sequences):
  write_gap_recording(tmp_path / 'gap')
  specs = [motion_spec(), pulse_spec(max_gap_ms=60.0)]

  recording_set = streams.load_streams(str(tmp_path), specs, 10.0, split_gap_s=split_gap_s)

  # The gap has 28 grid points at 10 Hz, so it lasts 2.8 s.
  assert len(recording_set.sequences) == sequences


def test_missing_edges_are_trimmed_and_counted(tmp_path):
  # The first three motion rows hold the missing marker -1 and pulse has no value there.
  motion_rows = [[t, -1.0, -1.0, 0] if t < 300 else [t, 1.0, 2.0, 0]
                 for t in range(0, 1001, 100)]
  pulse_rows = [[t, None if t < 300 else 60.0] for t in range(0, 1001, 100)]
  write_motion(tmp_path / 'a', motion_rows)
  write_pulse(tmp_path / 'a', pulse_rows)
  specs = [motion_spec(missing_values=(-1.0,)), pulse_spec()]

  recording_set = streams.load_streams(str(tmp_path), specs, 10.0)

  sequence = recording_set.sequences[0]
  assert sequence.length == 8
  np.testing.assert_array_equal(sequence.raw['motion'][0], [1.0, 2.0])
  key = 'grid points with no observed value at the start or end of a recording'
  assert recording_set.excluded[key] == 3


def test_missing_value_marker_hides_only_its_column(tmp_path):
  write_motion(tmp_path / 'a', [[0, 1.0, -1.0, 0], [100, 2.0, 5.0, 0], [200, 3.0, 6.0, 0]])
  write_pulse(tmp_path / 'a', [[0, 60.0], [200, 61.0]])
  specs = [motion_spec(missing_values=(-1.0,)), pulse_spec()]

  recording_set = streams.load_streams(str(tmp_path), specs, 10.0)

  observed = recording_set.sequences[0].observed['motion']
  np.testing.assert_array_equal(observed, [[True, False], [True, True], [True, True]])


def test_missing_column_names_file_and_column(tmp_path):
  write_csv(tmp_path / 'a' / 'motion.csv', ['timestamp', 'x'], [[0, 1.0], [100, 2.0]])
  write_pulse(tmp_path / 'a', PULSE_ROWS)

  with pytest.raises(ValueError, match=r"motion\.csv: column\(s\) \['y'\] not found"):
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)


def test_non_numeric_value_names_row_and_value(tmp_path):
  rows = [[0, 1.0, 1.0, 0], [100, 2.0, 2.0, 0], [200, 'abc', 3.0, 0]]
  write_motion(tmp_path / 'a', rows)
  write_pulse(tmp_path / 'a', PULSE_ROWS)

  with pytest.raises(ValueError) as error:
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  message = str(error.value)
  assert os.path.join(str(tmp_path), 'a', 'motion.csv') in message
  assert "column 'x'" in message
  assert 'data row 3 (line 4)' in message
  assert "value 'abc' is not a number" in message


@pytest.mark.parametrize('timestamp, problem', [
    ('soon', "'soon' is not a number"),
    (None, 'an empty field is not a timestamp'),
    ('NaN', "value 'NaN' is not a timestamp"),
])
def test_bad_timestamp_names_row_and_value(tmp_path, timestamp, problem):
  write_motion(tmp_path / 'a', [[0, 1.0, 1.0, 0], [timestamp, 2.0, 2.0, 0]])
  write_pulse(tmp_path / 'a', PULSE_ROWS)

  with pytest.raises(ValueError) as error:
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  message = str(error.value)
  assert "motion.csv: column 'timestamp', data row 2 (line 3)" in message
  assert problem in message


def test_infinite_value_is_rejected(tmp_path):
  write_motion(tmp_path / 'a', [[0, 1.0, 1.0, 0], [100, 'inf', 2.0, 0]])
  write_pulse(tmp_path / 'a', PULSE_ROWS)

  with pytest.raises(ValueError, match=r"column 'x', data row 2 .*'inf' is not finite"):
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)


def test_missing_input_file_raises(tmp_path):
  write_motion(tmp_path / 'rec-1', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'rec-1', PULSE_ROWS)
  write_pulse(tmp_path / 'rec-2', PULSE_ROWS)

  with pytest.raises(ValueError) as error:
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  path = os.path.join(tmp_path, 'rec-2', 'motion.csv')
  assert str(error.value) == (
      f"{path} not found: recording 'rec-2' in {tmp_path} lacks the input file 'motion.csv' of "
      "group 'motion', which every recording needs. Add the file or move that recording folder "
      'out.')


@pytest.mark.parametrize('content', ['', 'timestamp,x,y,label\n'])
def test_input_file_without_rows_raises(tmp_path, content):
  # A zero-byte file and a file with only its header row.
  write_pulse(tmp_path / 'a', PULSE_ROWS)
  path = tmp_path / 'a' / 'motion.csv'
  path.write_text(content)

  with pytest.raises(ValueError) as error:
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  assert str(error.value) == (
      f"{path} contains no data rows, so input group 'motion' has no samples in recording 'a'. "
      'Move that recording folder out or remove the group.')


@pytest.mark.parametrize('write_target, reason', [
    (lambda folder: None, 'file missing'),
    (lambda folder: write_pulse(folder, []), 'no data rows'),
])
def test_absent_target_is_missing_and_counted(tmp_path, write_target, reason):
  write_motion(tmp_path / 'a', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'a', PULSE_ROWS)
  write_motion(tmp_path / 'b', WRAPPED_MOTION_ROWS)
  write_target(tmp_path / 'b')

  recording_set = streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  without_target = [seq for seq in recording_set.sequences if seq.subject == 'b']
  assert len(without_target) == 1
  assert not without_target[0].observed['pulse'].any()
  assert without_target[0].observed['motion'].any()
  # Only motion defines the grid of 'b': 1000..1800 ms, with 1600 ms missing (100 ms away).
  assert without_target[0].length == 9
  assert recording_set.excluded[f'pulse: recordings without target data ({reason})'] == 1


def test_target_absent_everywhere_raises(tmp_path):
  write_motion(tmp_path / 'a', WRAPPED_MOTION_ROWS)

  with pytest.raises(ValueError, match=r"group 'pulse' has no observed value in any recording"):
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)


def test_empty_folder_raises(tmp_path):
  with pytest.raises(ValueError, match='contains no sub-folders'):
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)


def test_folder_not_found_raises(tmp_path):
  with pytest.raises(ValueError, match='not found'):
    streams.load_streams(str(tmp_path / 'absent'), [motion_spec(), pulse_spec()], 10.0)


def test_sub_folders_without_files_raise(tmp_path):
  write_csv(tmp_path / 'a' / 'notes.csv', ['timestamp'], [[0]])

  with pytest.raises(ValueError, match=r"no sub-folder of .* contains any of the stream files"):
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)


def test_sub_folder_without_files_is_counted(tmp_path):
  write_motion(tmp_path / 'a', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'a', PULSE_ROWS)
  os.makedirs(tmp_path / 'notes')

  recording_set = streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  assert recording_set.subjects == ['a']
  assert recording_set.excluded['sub-folders without any stream file'] == 1


def test_streams_without_overlap_are_skipped(tmp_path):
  write_motion(tmp_path / 'a', WRAPPED_MOTION_ROWS)
  write_pulse(tmp_path / 'a', PULSE_ROWS)
  write_motion(tmp_path / 'b', [[0, 1.0, 1.0, 0], [100, 1.0, 1.0, 0]])
  write_pulse(tmp_path / 'b', [[5000, 60.0], [5100, 60.0]])

  recording_set = streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], 10.0)

  assert recording_set.subjects == ['a']
  assert recording_set.excluded['recordings whose streams do not overlap in time'] == 1


@pytest.mark.parametrize('rate_hz, split_gap_s', [(0.0, 5.0), (math.nan, 5.0), (10.0, -1.0)])
def test_invalid_rate_or_gap_raises(tmp_path, rate_hz, split_gap_s):
  with pytest.raises(ValueError, match='is invalid'):
    streams.load_streams(str(tmp_path), [motion_spec(), pulse_spec()], rate_hz, split_gap_s)


def test_config_builds_specs_in_order():
  config = {
      'acc': {'file': 'accLabeled.csv', 'columns': 'x, y, z', 'role': 'input',
              'features': 'accel', 'max_gap_ms': 150},
      'hr': {'file': 'hrmLabeled.csv', 'columns': ['hrv'], 'role': 'input',
             'missing_values': '0', 'max_gap_ms': 1000},
      'gyro': {'file': 'gyrLabeled.csv', 'columns': 'x,y,z', 'role': 'target',
               'missing_values': '', 'max_gap_ms': 150.0, 'timestamp_column': 'time'},
  }

  specs = streams.stream_specs_from_config(config)

  assert [spec.group for spec in specs] == ['acc', 'hr', 'gyro']
  assert specs[0].columns == ('x', 'y', 'z')
  assert specs[0].features == 'accel'
  assert specs[0].missing_values == ()
  assert specs[1].columns == ('hrv',)
  assert specs[1].missing_values == (0.0,)
  assert specs[1].max_gap_ms == 1000.0
  assert specs[2].role == 'target'
  assert specs[2].missing_values == ()
  assert specs[2].timestamp_column == 'time'
  assert specs[2].features == 'raw'


def test_config_accepts_config_dict():
  config = ml_collections.ConfigDict({
      'wrist': {'file': 'a.csv', 'columns': 'x,y,z', 'role': 'input', 'max_gap_ms': 150},
      'ppg': {'file': 'p.csv', 'columns': ['ppg'], 'role': 'target', 'missing_values': [0, -1],
              'max_gap_ms': 150},
  })

  specs = streams.stream_specs_from_config(config)

  # A ConfigDict returns its keys sorted by name.
  assert [spec.group for spec in specs] == ['ppg', 'wrist']
  assert specs[0].columns == ('ppg',)
  assert specs[0].missing_values == (0.0, -1.0)
  assert specs[1].columns == ('x', 'y', 'z')


def config_with(**acc_fields):
  acc = {'file': 'a.csv', 'columns': 'x,y,z', 'role': 'input', 'max_gap_ms': 150}
  acc.update(acc_fields)
  return {'acc': acc,
          'gyro': {'file': 'g.csv', 'columns': 'x', 'role': 'target', 'max_gap_ms': 150}}


@pytest.mark.parametrize('acc_fields, pattern', [
    ({'role': 'inptu'}, r"stream group 'acc': role 'inptu' is invalid"),
    ({'columns': ''}, r"stream group 'acc', field columns: '' names no column"),
    ({'columns': []}, r"stream group 'acc', field columns"),
    ({'missing_values': 'none'}, r"stream group 'acc', field missing_values: 'none' is not a"),
    ({'max_gap_ms': 'soon'}, r"stream group 'acc', field max_gap_ms: 'soon' is not a number"),
    ({'max_gap_ms': 0}, r"stream group 'acc': max_gap_ms 0.0 is invalid"),
    ({'features': 'fancy'}, r"stream group 'acc', field features: unknown feature set"),
    ({'rate': 10}, r"stream group 'acc': unknown field\(s\) \['rate'\]"),
    ({'columns': 'x,x,y'}, r"stream group 'acc': columns .* repeat a name"),
])
def test_config_errors_name_group_and_field(acc_fields, pattern):
  with pytest.raises(ValueError, match=pattern):
    streams.stream_specs_from_config(config_with(**acc_fields))


def test_config_missing_field_raises():
  config = config_with()
  del config['acc']['max_gap_ms']

  with pytest.raises(ValueError, match=r"stream group 'acc': required field\(s\) \['max_gap_ms'\]"):
    streams.stream_specs_from_config(config)


@pytest.mark.parametrize('role', ['input', 'target'])
def test_config_without_role_raises(role):
  other = 'target' if role == 'input' else 'input'
  config = {'a': {'file': 'a.csv', 'columns': 'x', 'role': other, 'max_gap_ms': 100}}

  with pytest.raises(ValueError, match=f"no group with role '{role}'"):
    streams.stream_specs_from_config(config)


# The committed slice of real smartwatch recordings.

FIXTURE_CONFIG = {
    'acc': {'file': 'accLabeled.csv', 'columns': 'x,y,z', 'role': 'input', 'features': 'accel',
            'max_gap_ms': 150},
    'hr': {'file': 'hrmLabeled.csv', 'columns': 'hrv', 'role': 'input', 'missing_values': '0',
           'max_gap_ms': 1000},
    'gyro': {'file': 'gyrLabeled.csv', 'columns': 'x,y,z', 'role': 'target', 'max_gap_ms': 150},
    'ppg': {'file': 'ppgLabeled.csv', 'columns': 'ppg', 'role': 'target', 'max_gap_ms': 150},
}


@pytest.fixture(scope='module')
def fixture_set():
  specs = streams.stream_specs_from_config(FIXTURE_CONFIG)
  return streams.load_streams(FIXTURE, specs, 10.0)


def read_fixture_file(subject, file):
  return pl.read_csv(os.path.join(FIXTURE, subject, file), infer_schema_length=0)


def test_fixture_loads_three_subjects(fixture_set):
  assert fixture_set.subjects == ['exp-5', 'exp-7', 'exp-9']
  assert [seq.sequence_id for seq in fixture_set.sequences] == ['exp-5/0', 'exp-7/0', 'exp-9/0']
  assert [group.name for group in fixture_set.input_groups] == ['acc', 'hr']
  assert [group.name for group in fixture_set.target_groups] == ['gyro', 'ppg']
  assert fixture_set.input_groups[0].features == 'accel'
  assert fixture_set.source == f'sensor streams in {FIXTURE} (3 recordings at 10 Hz)'
  for sequence in fixture_set.sequences:
    # Each slice spans 75 s, so the common span at 10 Hz is a little under 750 points.
    assert 700 <= sequence.length <= 750


def test_fixture_observed_fractions(fixture_set):
  for sequence in fixture_set.sequences:
    for group in ('acc', 'gyro', 'ppg'):
      assert sequence.observed[group].mean() > 0.99, (sequence.sequence_id, group)

  # Each 1 Hz heart-rate row with hrv = 0 (no reading) hides about 10 grid points at 10 Hz.
  for sequence in fixture_set.sequences:
    hrv = read_fixture_file(sequence.subject, 'hrmLabeled.csv')['hrv'].cast(pl.Float64)
    zero_rows = int((hrv == 0).sum())
    missing_points = int((~sequence.observed['hr'][:, 0]).sum())
    assert abs(missing_points - 10 * zero_rows) <= 10, (sequence.subject, zero_rows)
  assert {seq.subject for seq in fixture_set.sequences if not seq.observed['hr'].all()} == {
      'exp-7', 'exp-9'}


def test_fixture_ppg_matches_brute_force_nearest(fixture_set):
  # The grid below starts at the common start, which holds only if no edge was trimmed.
  assert fixture_set.excluded[
      'grid points with no observed value at the start or end of a recording'] == 0
  files = ('accLabeled.csv', 'gyrLabeled.csv', 'ppgLabeled.csv', 'hrmLabeled.csv')
  for sequence in fixture_set.sequences:
    frames = {file: read_fixture_file(sequence.subject, file) for file in files}
    starts = [frame['timestamp'].cast(pl.Float64).min() for frame in frames.values()]
    grid = max(starts) + 100.0 * np.arange(sequence.length)
    ppg = frames['ppgLabeled.csv']
    file_times = ppg['timestamp'].cast(pl.Float64).to_numpy()
    if sequence.subject in ('exp-7', 'exp-9'):
      assert np.any(np.diff(file_times) < 0), 'the file should wrap around'
    # Sorting makes argmin pick the earlier of two equally near samples, as the loader does.
    order = np.argsort(file_times, kind='stable')
    times = file_times[order]
    values = ppg['ppg'].cast(pl.Float64).to_numpy()[order]

    distance = np.abs(grid[:, None] - times[None, :])
    nearest = distance.argmin(axis=1)
    expected = np.where(distance.min(axis=1) <= 150, values[nearest], np.nan)

    np.testing.assert_array_equal(sequence.raw['ppg'][:, 0], expected, err_msg=sequence.subject)


def test_fixture_accelerometer_sees_gravity(fixture_set):
  accel = features.feature_set('accel', ('x', 'y', 'z'))
  for sequence in fixture_set.sequences:
    values, observed = features.engineer(
        accel, sequence.raw['acc'], sequence.observed['acc'], sequence.sequence_id)
    magnitude = values[observed[:, 3], 3]
    # The wrist accelerometer includes gravity, so its mean magnitude is near 9.81 m/s².
    assert 8.0 < magnitude.mean() < 12.0, sequence.sequence_id


def test_fixture_counts_repeated_timestamps(fixture_set):
  for group, file in (('acc', 'accLabeled.csv'), ('gyro', 'gyrLabeled.csv')):
    repeated = 0
    for subject in fixture_set.subjects:
      timestamps = read_fixture_file(subject, file)['timestamp']
      repeated += timestamps.len() - timestamps.n_unique()
    assert repeated > 0
    key = f'{group}: rows sharing a timestamp, averaged into one'
    assert fixture_set.excluded[key] == repeated


@pytest.mark.parametrize('path', ['', 'train.csv'])
def test_stream_preset_needs_a_folder(path):
  config = bfrb_watch.get_config()
  config.data.path = path
  with pytest.raises(ValueError, match=f"data.streams describes sensor streams, but "
                                       f"data.path='{path}' is not a folder"):
    sources.load_recordings(config.data)


def test_label_stream_timestep_labels():
  specs = streams.stream_specs_from_config(bfrb_watch.get_config().data.streams.to_dict())
  assert [spec.group for spec in specs if spec.role == 'label'] == ['behaviour']
  plain = streams.load_streams(FIXTURE, [s for s in specs if s.role != 'label'], 10.0)
  labelled = streams.load_streams(FIXTURE, specs, 10.0)
  assert [s.sequence_id for s in labelled.sequences] == [s.sequence_id for s in plain.sequences]
  assert [g.name for g in labelled.groups] == [g.name for g in plain.groups]
  for a, b in zip(plain.sequences, labelled.sequences):
    assert a.timestep_labels is None
    assert b.timestep_labels.shape == (b.length,)
    for name in a.raw:
      np.testing.assert_array_equal(a.raw[name], b.raw[name])
  # The grid point nearest each accelerometer row carries that row's label.
  values = np.concatenate([s.timestep_labels for s in labelled.sequences])
  file_labels = set()
  for subject in ('exp-5', 'exp-7', 'exp-9'):
    frame = pl.read_csv(os.path.join(FIXTURE, subject, 'accLabeled.csv'),
                        columns=['label'])
    file_labels |= set(frame['label'].to_list())
  finite = values[np.isfinite(values)]
  assert finite.size > 0.9 * values.size
  assert set(np.unique(finite)) <= {float(v) for v in file_labels}
  assert len(np.unique(finite)) >= 2


def test_label_stream_needs_one_column():
  with pytest.raises(ValueError, match='a label stream has one column'):
    streams.StreamSpec(group='behaviour', file='accLabeled.csv', columns=('label', 'stage'),
                       role='label', max_gap_ms=150.0)
