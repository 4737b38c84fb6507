"""The command line as a user runs it, each run in its own process."""

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from configs import bfrb_watch
from imputer import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'bfrb_watch_slice')
TINY = [
    '--config.model.hidden_dim=16', '--config.model.encoder_layers=1',
    '--config.model.decoder_layers=1', '--config.model.num_heads=2', '--config.data.window=16',
    '--config.data.train_stride=8',
    '--config.data.num_folds=3', '--config.batch_size=8', '--config.eval_batch_size=16',
    '--config.log_every_steps=2', '--config.eval_every_steps=4',
    '--config.checkpoint_every_steps=4',
]


def launch(workdir, config, *args, devices=1):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS='cpu')
  command = [sys.executable, 'launch.py', f'--config={config}', f'--workdir={workdir}', *TINY,
             *args]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def read_report(workdir):
  with open(os.path.join(workdir, 'eval_report.json')) as f:
    return json.load(f)


def test_cmi_csv_run_reports_and_probes(trained_cmi_run):
  # The session's phase 1 run, trained in-process on a CMI CSV with IMU-only sequences.
  report = read_report(trained_cmi_run.workdir)
  assert report['source'] == f'CMI file {trained_cmi_run.csv}'
  assert report['synthetic'] is False
  assert set(report['scenarios']) == {'random_mask', 'imu_only'}
  thm = report['scenarios']['random_mask']['model']['thm']
  assert thm['count'] > 0
  assert np.isfinite(thm['mae'])
  assert report['sequences']['skipped_without_ground_truth'] > 0
  assert report['probe']['gesture']['model']['scored_windows'] > 0
  assert set(report['scenarios']['imu_only']['calibration']) == {'distribution', 'thm', 'tof'}


@pytest.mark.parametrize('config', ['configs/phase6.py'])
def test_cmi_csv_imu_only_and_no_return(tmp_path, config):
  frame = synthetic.generate_cmi_frame(num_subjects=4, sequences_per_subject=4, min_length=20,
                                       max_length=30, imu_only_fraction=0.25, seed=3)
  tof = frame.select(pl.col('^tof_.*$')).to_numpy()
  assert (tof == -1).any()
  imu_only = frame.group_by('sequence_id').agg(pl.col('thm_1').is_null().all().alias('none'))
  assert imu_only['none'].any()
  path = tmp_path / 'train.csv'
  frame.write_csv(path)
  workdir = tmp_path / 'run'
  result = launch(workdir, config, f'--config.data.path={path}',
                  '--config.num_train_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  report = read_report(workdir)
  assert report['source'] == f'CMI file {path}'
  assert report['synthetic'] is False
  assert set(report['scenarios']) == {'random_mask', 'imu_only'}
  thm = report['scenarios']['random_mask']['model']['thm']
  assert thm['count'] > 0
  assert np.isfinite(thm['mae'])
  assert 'step 4/4' in result.stderr
  # The CMI file labels every sequence with its gesture, so the gesture probe runs.
  assert report['probe']['gesture']['model']['scored_windows'] > 0
  assert set(report['probe']['groups']) == {'thm', 'tof'}


def test_cmi_missing_column_named(tmp_path):
  frame = synthetic.generate_cmi_frame(num_subjects=3, sequences_per_subject=2, seed=0)
  path = tmp_path / 'broken.csv'
  frame.drop('thm_3').write_csv(path)
  result = launch(tmp_path / 'run', 'configs/phase1.py', f'--config.data.path={path}')
  assert result.returncode != 0
  assert 'thm_3' in result.stderr
  assert 'broken.csv' in result.stderr


def test_misspelt_config_field_is_rejected(tmp_path):
  result = launch(tmp_path / 'run', 'configs/phase1.py', '--config.batchsize=4')
  assert result.returncode != 0
  assert 'batchsize' in result.stderr


def test_watch_preset_keeps_each_phase_setting():
  # Training with each phase's settings is covered by the CMI runs; the preset only adds data.
  phase6 = bfrb_watch.get_config('phase6')
  assert phase6.lambda_contrastive == 0.1
  assert phase6.model.sensor_embedding
  assert phase6.data.streams.behaviour.role == 'label'
  assert bfrb_watch.get_config('').lambda_contrastive == 0.0


def test_watch_preset_trains_on_stream_fixture(tmp_path):
  workdir = tmp_path / 'run'
  result = launch(workdir, 'configs/bfrb_watch.py', f'--config.data.path={FIXTURE}',
                  '--config.num_train_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  report = read_report(workdir)
  assert set(report['scenarios']['random_mask']['model']) == {'gyro', 'ppg'}
  assert len(report['split']['test']) == 1
  assert set(report['probe']['groups']) == {'gyro', 'ppg'}
  assert report['probe']['gesture'] is None  # The streams carry no sequence labels.
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['lambda_contrastive'] == 0.0
  assert config['data']['streams']['behaviour']['role'] == 'label'
  # The behaviour label stream turns the recordings into labelled segments downstream.
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, 'launch.py', '--mode=downstream',
                           f'--workdir={workdir}'], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'downstream.json')) as f:
    downstream = json.load(f)
  assert downstream['unit'] == 'segment of 16 timesteps'
  assert 'none' in downstream['classes']
  assert set(downstream['settings']) == {'imu_only', 'imu_imputed', 'imu_real'}


def test_watch_preset_rejects_unknown_phase(tmp_path):
  result = launch(tmp_path / 'run', 'configs/bfrb_watch.py:phase9',
                  f'--config.data.path={FIXTURE}')
  assert result.returncode != 0
  assert 'phase9' in result.stderr
  assert 'phase0, phase1, phase2, phase3, phase4, phase5, phase6, phase7' in result.stderr


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r]


def test_two_devices_match_one_device(tmp_path):
  args = ['configs/phase1.py', '--config.num_train_steps=4',
          '--config.data.synthetic.num_subjects=4', '--config.data.synthetic.sequences_per_subject=6']
  runs = {}
  for devices in (1, 2):
    workdir = tmp_path / f'devices_{devices}'
    result = launch(workdir, *args, devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'local devices [{", ".join(f"CpuDevice(id={i})" for i in range(devices))}]' in (
        result.stderr)
    runs[devices] = train_losses(workdir)
  assert len(runs[1]) == 2
  np.testing.assert_allclose(runs[1], runs[2], rtol=2e-4)
