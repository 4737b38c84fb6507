"""Studies: the plan, resuming, tables against numpy, plots and the best config."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import phase7
from imputer import study
from imputer import study_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_study(**changes):
  config = phase7.get_config()
  config.study.ablations = 'uncertainty,curriculum,consistency'
  config.study.grid = 'lambda_cons=0.05,0.2;lambda_denoise=0.05,0.2'
  config.study.seeds = 2
  for key, value in changes.items():
    *parents, leaf = key.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def test_plan_lists_full_ablations_and_grid():
  variants = study.plan(small_study())
  assert [v.name for v in variants] == [
      'full', 'no_uncertainty', 'no_curriculum', 'no_consistency',
      'grid_lambda_cons=0.05_lambda_denoise=0.05', 'grid_lambda_cons=0.05_lambda_denoise=0.2',
      'grid_lambda_cons=0.2_lambda_denoise=0.05', 'grid_lambda_cons=0.2_lambda_denoise=0.2']
  changes = {v.name: dict(v.changes) for v in variants}
  assert changes['full'] == {}
  assert changes['no_uncertainty'] == {'loss.kind': 'mae'}
  assert changes['no_curriculum'] == {'mask_start': 0.75, 'mask_epochs': 0}
  assert changes['no_consistency'] == {'lambda_cons': 0.0}
  assert changes['grid_lambda_cons=0.2_lambda_denoise=0.05'] == {
      'lambda_cons': 0.2, 'lambda_denoise': 0.05}


def test_every_ablation_changes_the_full_model():
  config = phase7.get_config()
  variants = study.plan(config)
  assert len(variants) == 1 + 8 + 16
  assert all(v.changes for v in variants[1:])
  assert dict(variants[8].changes) == {'model.decoder': 'dual'}


def test_variant_config_is_plain_run():
  config = small_study()
  variant = study.plan(config)[3]
  copy = study.variant_config(config, variant.changes, seed_offset=1)
  assert copy.lambda_cons == 0.0
  assert copy.seed == config.seed + 1
  assert copy.study.ablations == ''
  assert copy.study.grid == ''
  assert config.lambda_cons == 0.1  # The base is left alone.


@pytest.mark.parametrize('grid,message', [
    ('lambda_cons', 'is not field=v1,v2'),
    ('lambda_conz=0.1,0.2', "field 'lambda_conz' is not in the config"),
    ('lambda_cons=0.1,abc', "value 'abc' of lambda_cons is not of type float"),
    ('model=1,2', "'model' is a section"),
    ('lambda_cons=0.1,0.1', 'lists a value twice'),
    ('lambda_cons=0.1;lambda_cons=0.2', 'names a field twice'),
])
def test_bad_grid_is_rejected(grid, message):
  with pytest.raises(ValueError, match=message):
    study.plan(small_study(**{'study.grid': grid}))


def test_unknown_ablation_is_rejected():
  with pytest.raises(ValueError, match=r"\['dropout'\] unknown\. Use any of"):
    study.plan(small_study(**{'study.ablations': 'consistency,dropout'}))


def fake_report(score):
  """A report whose model figures follow `score`, in the layout train writes."""
  group = lambda mae, r2: {'mae': mae, 'r2': r2}
  return {
      'scenarios': {
          'random_mask': {'model': {'thm': group(1.0 + score, 0.5 - score),
                                    'tof': group(10.0 + score, 0.6 - score)}},
          'imu_only': {'model': {'thm': group(2.0 + score, 0.2 - score),
                                 'tof': group(20.0 + score, None)}},
      },
      'probe': {'groups': {'thm': {'model': {'r2': 0.3 - score}},
                           'tof': {'model': {'r2': 0.1}}}},
  }


def scores_of(config):
  """A made-up, deterministic score per run: lower is better, the seed adds noise."""
  return 0.01 * config.seed + 0.1 * config.lambda_cons + 0.05 * config.lambda_denoise + (
      0.3 if config.loss.kind == 'mae' else 0.0)


class FakeTrainer:
  """Writes the two reports as a finished run would, and records what it trained."""

  def __init__(self):
    self.trained = []

  def __call__(self, config, workdir):
    os.makedirs(workdir, exist_ok=True)
    self.trained.append(workdir)
    score = scores_of(config)
    for name in ('eval_report', 'validation_report'):
      with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
        json.dump(fake_report(score), f)


def test_study_resumes_and_skips_finished(tmp_path):
  config = small_study()
  trainer = FakeTrainer()
  variants = study.run_sequential(config, str(tmp_path), trainer)
  assert len(trainer.trained) == len(variants) * 2 == 16
  again = FakeTrainer()
  study.run_sequential(config, str(tmp_path), again)
  assert again.trained == []
  # A run killed before its report: only it trains again.
  unfinished = study.run_dir(str(tmp_path), variants[2], 1)
  os.remove(os.path.join(unfinished, 'eval_report.json'))
  study.run_sequential(config, str(tmp_path), again)
  assert again.trained == [unfinished]


def test_study_with_other_plan_is_rejected(tmp_path):
  study.run_sequential(small_study(), str(tmp_path), FakeTrainer())
  with pytest.raises(ValueError, match='study.seeds: 2 in the workdir, 3 now'):
    study.run_sequential(small_study(**{'study.seeds': 3}), str(tmp_path), FakeTrainer())


def test_outputs_match_numpy(tmp_path):
  config = small_study()
  variants = study.run_sequential(config, str(tmp_path), FakeTrainer())
  summary = study_results.write_outputs(str(tmp_path), config, variants)
  with open(tmp_path / 'results.csv') as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    records = {r['variant']: r for r in reader}
  assert set(records) == {v.name for v in variants}
  # no_uncertainty trains with plain MAE: score 0.3 higher than full for both seeds.
  full = [scores_of(study.variant_config(config, (), s)) for s in range(2)]
  ablated = [scores_of(study.variant_config(config, variants[1].changes, s)) for s in range(2)]
  thm_mae = lambda scores: [1.0 + s for s in scores]
  record = records['no_uncertainty']
  np.testing.assert_allclose(float(record['random_mask/thm/mae_mean']),
                             np.mean(thm_mae(ablated)))
  np.testing.assert_allclose(float(record['random_mask/thm/mae_std']), np.std(thm_mae(ablated)))
  np.testing.assert_allclose(float(record['random_mask/thm/mae_delta']),
                             np.mean(thm_mae(ablated)) - np.mean(thm_mae(full)))
  assert record['imu_only/tof/r2_mean'] == ''  # No R² in any seed: left empty, not 0.
  assert 'probe/thm/r2_delta' in header
  # The best variant has the lowest made-up score: no consistency (lambda_cons 0) wins.
  assert summary['best'] == 'no_consistency'
  markdown = (tmp_path / 'results.md').read_text()
  assert '| no_consistency |' in markdown
  assert '## probe' in markdown


def test_plots_are_drawn(tmp_path):
  config = small_study()
  variants = study.run_sequential(config, str(tmp_path), FakeTrainer())
  summary = study_results.write_outputs(str(tmp_path), config, variants)
  assert summary['plots'] == ['ablations.png', 'grid_lambda_cons_vs_lambda_denoise.png']
  for name in summary['plots']:
    with Image.open(tmp_path / name) as image:
      pixels = np.asarray(image.convert('L'))
      assert image.size[0] >= 300
      assert image.size[1] >= 200
      assert pixels.std() > 10  # Not a blank canvas.


def test_best_config_loads_and_runs(tmp_path):
  config = small_study()
  variants = study.run_sequential(config, str(tmp_path), FakeTrainer())
  summary = study_results.write_outputs(str(tmp_path), config, variants)
  spec = importlib.util.spec_from_file_location('best', summary['best_config'])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  best = module.get_config()
  assert best.lambda_cons == 0.0
  assert best.study.ablations == ''
  assert best.to_dict() == study.variant_config(config, variants[3].changes).to_dict()
  on_tpu = module.get_config('tpu')
  assert (on_tpu.platform, on_tpu.model.compute_dtype, on_tpu.lambda_cons) == (
      'tpu', 'bfloat16', 0.0)
  tiny = ['--config.model.hidden_dim=16', '--config.model.encoder_layers=1',
          '--config.model.decoder_layers=1', '--config.model.num_heads=2',
          '--config.data.window=16', '--config.data.train_stride=8',
          '--config.data.num_folds=3', '--config.batch_size=8', '--config.eval_batch_size=16',
          '--config.contrastive.queue_size=16', '--config.num_train_steps=2',
          # The sensor stage only slows compilation here; phase 6 with it is launched in
          # tests/test_launch.py.
          '--config.model.sensor_embedding=False',
          '--config.data.synthetic.num_subjects=4',
          '--config.data.synthetic.sequences_per_subject=4']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, 'launch.py', f'--config={summary["best_config"]}',
       f'--workdir={tmp_path / "best_run"}', *tiny], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'best_run' / 'eval_report.json').exists()


def test_ablations_without_grid_add_no_grid_variant():
  variants = study.plan(small_study(**{'study.grid': ''}))
  assert [v.name for v in variants] == ['full', 'no_uncertainty', 'no_curriculum',
                                        'no_consistency']


@pytest.mark.parametrize('changes,message', [
    ({'study.ablations': 'consistency,consistency'}, 'lists a component twice'),
    ({'study.grid': 'seed=0,1'}, "'seed' cannot be a grid field"),
    ({'study.grid': 'study.seeds=1,2'}, "'study.seeds' cannot be a grid field"),
])
def test_bad_study_settings_rejected(changes, message):
  with pytest.raises(ValueError, match=message):
    study.plan(small_study(**changes))


def test_bad_variant_fails_before_training(tmp_path):
  trainer = FakeTrainer()
  config = small_study(**{'study.grid': 'contrastive.queue_size=4,64'})
  with pytest.raises(ValueError, match=r'variant grid_contrastive.queue_size=4: '
                                       r'contrastive.queue_size=4 is invalid'):
    study.run_sequential(config, str(tmp_path), trainer)
  assert trainer.trained == []
  assert not (tmp_path / 'study.json').exists()
  with pytest.raises(ValueError, match='study.seeds=0 is invalid'):
    study.run_sequential(small_study(**{'study.seeds': 0}), str(tmp_path), trainer)


def test_relaunch_with_other_base_config_rejected(tmp_path):
  study.run_sequential(small_study(), str(tmp_path), FakeTrainer())
  with pytest.raises(ValueError, match=r'model.hidden_dim: 64 in the workdir, 32 now'):
    study.run_sequential(small_study(**{'model.hidden_dim': 32}), str(tmp_path),
                         FakeTrainer())
  # Logging cadence may change, as for a single run.
  study.run_sequential(small_study(log_every_steps=7), str(tmp_path), FakeTrainer())
