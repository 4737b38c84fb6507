"""Impute mode: fill the THM/ToF that a CMI-schema table lacks, from a trained workdir."""

import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from imputer import cmi
from imputer import impute
from imputer import windows as windows_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_COLUMNS = tuple(c for c in cmi.CMI_SENSOR_COLUMNS if c.startswith(('thm_', 'tof_')))


def blank_input(frame: pl.DataFrame, seed: int = 0) -> tuple[pl.DataFrame, list[str]]:
  """Return (frame, blanked ids) with two sequences' THM/ToF blanked and scattered THM holes.

  Blanked cells are nulls, as in IMU-only recordings. About 5% of the THM cells become NaN.
  """
  ids = frame['sequence_id'].unique(maintain_order=True).to_list()
  has_targets = frame.group_by('sequence_id', maintain_order=True).agg(
      pl.col('thm_1').is_not_null().any().alias('any'))
  with_targets = has_targets.filter(pl.col('any'))['sequence_id'].to_list()
  blanked = with_targets[:2]
  out = frame.with_columns(
      pl.when(pl.col('sequence_id').is_in(blanked)).then(None).otherwise(pl.col(c)).alias(c)
      for c in TARGET_COLUMNS)
  rng = np.random.default_rng(seed)
  thm = out.select(cmi.features.CMI_THM_COLUMNS).to_numpy().astype(float)
  holes = rng.random(thm.shape) < 0.05
  thm[holes] = np.nan
  out = out.with_columns(pl.Series(c, thm[:, k]) for k, c in
                         enumerate(cmi.features.CMI_THM_COLUMNS))
  assert len(ids) > 2
  return out, blanked


def as_float(frame, columns=TARGET_COLUMNS):
  return frame.select(pl.col(c).cast(pl.Float64) for c in columns).to_numpy()


@pytest.fixture(scope='module')
def blanked(trained_cmi_run, tmp_path_factory):
  root = tmp_path_factory.mktemp('impute')
  frame, ids = blank_input(trained_cmi_run.frame)
  path = root / 'input.csv'
  frame.write_csv(path)
  return frame, ids, str(path), root


def test_impute_fills_gaps_keeps_the_rest(trained_cmi_run, blanked):
  frame, ids, path, root = blanked
  output = str(root / 'filled.csv')
  summary = impute.impute_file(trained_cmi_run.workdir, path, output, uncertainty=True,
                               progress=False)
  result = pl.read_csv(output, schema_overrides=cmi.csv_schema_overrides(frame.columns))
  assert result.height == frame.height
  # Every other column, row order included, is unchanged.
  others = [c for c in frame.columns if c not in TARGET_COLUMNS]
  assert result.select(others).equals(frame.select(others))
  before, after = as_float(frame), as_float(result)
  missing = np.isnan(before)
  assert not np.isnan(after).any()
  # Observed values come back bit for bit, -1 (no return) included.
  assert np.array_equal(before[~missing].view(np.int64), after[~missing].view(np.int64))
  assert (after[missing] != 0).mean() > 0.9
  # Flags: a group is marked in exactly the rows where one of its cells was empty.
  thm = [i for i, c in enumerate(TARGET_COLUMNS) if c.startswith('thm_')]
  tof = [i for i, c in enumerate(TARGET_COLUMNS) if c.startswith('tof_')]
  np.testing.assert_array_equal(result['thm_imputed'].to_numpy(), missing[:, thm].any(axis=1))
  np.testing.assert_array_equal(result['tof_imputed'].to_numpy(), missing[:, tof].any(axis=1))
  blanked_rows = frame['sequence_id'].is_in(ids).to_numpy()
  assert result['tof_imputed'].to_numpy()[blanked_rows].all()
  # Standard deviations: positive where filled, 0 where the value was kept.
  std = result.select(f'{c}_std' for c in TARGET_COLUMNS).to_numpy()
  assert (std[missing] > 0).all()
  assert (std[~missing] == 0).all()
  assert summary['rows'] == frame.height
  assert summary['filled_values']['thm'] == int(missing[:, thm].sum())
  assert summary['filled_values']['tof'] == int(missing[:, tof].sum())


def test_overlapping_windows_are_averaged(trained_cmi_run):
  imputer = impute.load_imputer(trained_cmi_run.workdir)
  recording_set = cmi.from_cmi_frame(trained_cmi_run.frame, 'test frame')
  sequence = max(recording_set.sequences, key=lambda s: s.length)
  window, stride = imputer.window, 5
  assert sequence.length > 3 * window
  prediction = impute.predict_sequences(imputer, [sequence], stride)[0]
  # By hand: run every window through the model and average per timestep in numpy.
  layouts = imputer.input_layouts + imputer.target_layouts
  engineered = windows_lib.engineer_sequences([sequence], layouts)
  windows = windows_lib.make_windows(engineered, layouts, imputer.scalers, window, stride)
  batch = windows.take(np.arange(len(windows)))
  recon, log_var = imputer.predict_fn(imputer.params, batch, np.bool_(True))
  mean = np.asarray(recon['thm'], np.float64)
  variance = (np.sqrt(2.0) * np.exp(np.asarray(log_var['thm'], np.float64))) ** 2
  for t in (0, window // 2, window + 3, sequence.length - 1):
    rows = [r for r, (_, start, size) in enumerate(windows.index) if start <= t < start + size]
    mu = np.array([mean[r, t - windows.index[r, 1]] for r in rows])
    var = np.array([variance[r, t - windows.index[r, 1]] for r in rows])
    scale = imputer.scalers['thm'].scale[:5]
    expected_mean = mu.mean(axis=0) * scale + imputer.scalers['thm'].center[:5]
    expected_std = np.sqrt(var.mean(axis=0) + mu.var(axis=0)) * scale
    np.testing.assert_allclose(prediction.mean['thm'][t], expected_mean, rtol=1e-5)
    np.testing.assert_allclose(prediction.std['thm'][t], expected_std, rtol=1e-5)


def test_chunks_and_parquet_agree(trained_cmi_run, blanked):
  frame, _, path, root = blanked
  whole, chunked = str(root / 'whole.csv'), str(root / 'chunked.parquet')
  impute.impute_file(trained_cmi_run.workdir, path, whole, progress=False)
  impute.impute_file(trained_cmi_run.workdir, path, chunked, chunk_rows=37, progress=False)
  a = pl.read_csv(whole, schema_overrides=cmi.csv_schema_overrides(frame.columns))
  b = pl.read_parquet(chunked)
  assert a.columns == b.columns
  np.testing.assert_allclose(as_float(a), as_float(b), rtol=1e-6)
  assert not os.path.exists(chunked + '.partial')


def test_missing_checkpoint_is_named(trained_cmi_run, blanked, tmp_path):
  _, _, path, _ = blanked
  workdir = tmp_path / 'untrained'
  workdir.mkdir()
  with pytest.raises(ValueError, match='contains no trained run'):
    impute.impute_file(str(workdir), path, str(tmp_path / 'out.csv'), progress=False)
  shutil.copy(os.path.join(trained_cmi_run.workdir, 'config.json'), workdir / 'config.json')
  with pytest.raises(ValueError, match='has no checkpoint'):
    impute.impute_file(str(workdir), path, str(tmp_path / 'out.csv'), progress=False)
  assert not os.path.exists(tmp_path / 'out.csv')


def test_schema_mismatch_names_the_columns(trained_cmi_run, blanked, tmp_path):
  frame, _, _, _ = blanked
  path = tmp_path / 'no_thm.csv'
  frame.drop('thm_3', 'tof_2_v7').write_csv(path)
  with pytest.raises(ValueError, match=r'missing 2 required column\(s\): thm_3, tof_2_v7'):
    impute.impute_file(trained_cmi_run.workdir, str(path), str(tmp_path / 'out.csv'),
                       progress=False)


def test_complete_input_is_rejected(trained_cmi_run, tmp_path):
  frame = trained_cmi_run.frame
  with_targets = frame.group_by('sequence_id').agg(pl.col('thm_1').is_not_null().all())
  keep = with_targets.filter(pl.col('thm_1'))['sequence_id']
  complete = frame.filter(pl.col('sequence_id').is_in(keep.implode()))
  complete = complete.with_columns(pl.col(c).fill_null(-1.0) for c in cmi.CMI_TOF_COLUMNS)
  complete = complete.with_columns(pl.col(c).fill_null(30.0).fill_nan(30.0)
                                   for c in cmi.features.CMI_THM_COLUMNS)
  path = tmp_path / 'complete.csv'
  complete.write_csv(path)
  output = tmp_path / 'out.csv'
  with pytest.raises(ValueError, match='nothing to impute'):
    impute.impute_file(trained_cmi_run.workdir, str(path), str(output), progress=False)
  assert not os.path.exists(output)
  assert not os.path.exists(f'{output}.partial')


def test_late_bad_cell_leaves_no_output(trained_cmi_run, blanked, tmp_path):
  frame, _, _, _ = blanked
  row = frame.height - 3
  text = frame.with_columns(pl.col('thm_2').cast(pl.String))
  text = text.with_columns(
      pl.when(pl.int_range(pl.len()) == row).then(pl.lit('warm')).otherwise(pl.col('thm_2'))
      .alias('thm_2'))
  path = tmp_path / 'bad.csv'
  text.write_csv(path)
  output = tmp_path / 'out.csv'
  with pytest.raises(ValueError, match=rf"'thm_2' contains the non-numeric value 'warm' at data "
                                       rf"row {row + 1}"):
    impute.impute_file(trained_cmi_run.workdir, str(path), str(output), chunk_rows=50,
                       progress=False)
  assert not os.path.exists(output)
  assert not os.path.exists(f'{output}.partial')


def test_interleaved_sequences_are_rejected(trained_cmi_run, blanked, tmp_path):
  frame, _, _, _ = blanked
  first = frame['sequence_id'][0]
  rows = frame.with_row_index('row')
  moved = pl.concat([rows.filter(pl.col('row') != 1), rows.filter(pl.col('row') == 1)])
  path = tmp_path / 'interleaved.csv'
  moved.drop('row').write_csv(path)
  with pytest.raises(ValueError, match=rf"sequence_id '{first}' appears again at data row "
                                       rf"{frame.height}"):
    impute.impute_file(trained_cmi_run.workdir, str(path), str(tmp_path / 'out.csv'),
                       progress=False)


def test_launch_impute_mode(trained_cmi_run, blanked):
  _, _, path, root = blanked
  output = root / 'cli.parquet'
  # 3 devices, which divide neither the run's evaluation batch nor its training devices.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='3')
  result = subprocess.run(
      [sys.executable, 'launch.py', '--mode=impute', f'--workdir={trained_cmi_run.workdir}',
       f'--input={path}', f'--output={output}', '--uncertainty'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'rows/s' in result.stderr  # The progress bar.
  written = pl.read_parquet(output)
  assert 'thm_1_std' in written.columns
  assert not np.isnan(as_float(written)).any()
  one_device = root / 'one_device.parquet'
  impute.impute_file(trained_cmi_run.workdir, path, str(one_device), uncertainty=True,
                     progress=False)
  # The same values up to float rounding, which the split over devices changes.
  np.testing.assert_allclose(as_float(written), as_float(pl.read_parquet(one_device)),
                             rtol=1e-5, atol=1e-4)
  # A bad input ends with the message alone, without a traceback.
  result = subprocess.run(
      [sys.executable, 'launch.py', '--mode=impute', f'--workdir={trained_cmi_run.workdir}',
       f'--input={root}/absent.csv', f'--output={root}/out.csv'], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert 'absent.csv: file not found' in result.stderr
  assert 'Traceback' not in result.stderr


def truncated(frame, path):
  frame.write_csv(path)
  with open(path, 'rb+') as f:
    f.truncate(os.path.getsize(path) - 1500)


def short_row_inside(frame, path):
  frame.write_csv(path)
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  lines[40] = lines[40].rsplit(',', 3)[0] + '\n'  # Data row 40 loses its last 3 fields.
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(lines)


def empty_sequence_id(frame, path):
  frame.with_columns(pl.when(pl.int_range(pl.len()) == 30).then(None)
                     .otherwise(pl.col('sequence_id')).alias('sequence_id')).write_csv(path)


def header_only(frame, path):
  frame.head(0).write_csv(path)


@pytest.mark.parametrize('make, message', [
    (truncated, r'the last row has \d+ of the header\'s 341 fields .*so the file looks cut off'),
    (short_row_inside, r"data row 40 \(line 41\) has 338 of the header's 341 fields"),
    (empty_sequence_id, r"column 'sequence_id' is empty at data row 31"),
    (header_only, 'the table has a header but no data rows'),
])
def test_bad_input_is_named(trained_cmi_run, tmp_path, make, message):
  path = str(tmp_path / 'input.csv')
  make(trained_cmi_run.frame, path)
  output = tmp_path / 'out.csv'
  with pytest.raises(ValueError, match=message):
    impute.impute_file(trained_cmi_run.workdir, path, str(output), progress=False)
  assert not os.path.exists(output)


def test_bad_output_path_is_named(trained_cmi_run, blanked, tmp_path):
  _, _, path, _ = blanked
  with pytest.raises(ValueError, match='does not exist; create it first'):
    impute.impute_file(trained_cmi_run.workdir, path, str(tmp_path / 'no' / 'out.csv'))
  (tmp_path / 'folder.csv').mkdir()
  with pytest.raises(ValueError, match='is a folder'):
    impute.impute_file(trained_cmi_run.workdir, path, str(tmp_path / 'folder.csv'))


def test_incomplete_checkpoint_is_named(trained_cmi_run, blanked, tmp_path):
  _, _, path, _ = blanked
  workdir = tmp_path / 'stopped'
  (workdir / 'checkpoints' / '10').mkdir(parents=True)
  shutil.copy(os.path.join(trained_cmi_run.workdir, 'config.json'), workdir / 'config.json')
  with pytest.raises(ValueError, match='the checkpoint could not be read'):
    impute.impute_file(str(workdir), path, str(tmp_path / 'out.csv'), progress=False)
