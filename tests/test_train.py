"""End-to-end training on tiny synthetic data: loss, outputs, resume and report."""

import json
import os
import shutil
import signal

import chex
import jax
import numpy as np
import pytest

from imputer import augment
from imputer import checkpointing
from imputer import evaluation
from imputer import models
from imputer import preemption
from imputer import scaling
from imputer import sharding
from imputer import sources
from imputer import train
from imputer import training
from tests.helpers import tiny_config  # noqa: F401  (other test files use it from here)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  # The mask ratio ramps over the first 10 epochs, so the resume test restarts mid-ramp.
  config = tiny_config(num_train_steps=80, mask_start=0.4, mask_end=0.6, mask_epochs=10,
                       **{'loss.kind': 'mae', 'optim.learning_rate': 3e-3})
  report = train.train_and_evaluate(config, workdir)
  return config, workdir, report


def test_training_loss_falls(finished_run):
  _, workdir, _ = finished_run
  losses = [r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r]
  assert len(losses) == 8
  assert losses[-1] < 0.8 * losses[0], losses


def test_mask_ratio_ramps_then_holds(finished_run):
  _, workdir, _ = finished_run
  records = [r for r in read_metrics(workdir) if 'train/mask_ratio' in r]
  scheduled = [r['train/mask_ratio'] for r in records]
  assert scheduled[0] < scheduled[1] < scheduled[2]
  np.testing.assert_allclose(scheduled[-1], 0.6, rtol=1e-6)
  applied = [r['train/mask_ratio_applied'] for r in records]
  # The applied ratio also counts IMU-only windows, which hide everything.
  assert all(a >= 0.8 * s for a, s in zip(applied, scheduled))


def test_run_writes_every_output(finished_run):
  _, workdir, _ = finished_run
  names = set(os.listdir(workdir))
  assert {'config.json', 'scalers.json', 'metrics.jsonl', 'eval_report.json',
          'eval_report.md', 'checkpoints', 'checkpoints_best'} <= names
  assert any(n.startswith('events.out.tfevents') for n in names)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int)[-1] == '80'
  keys = set().union(*read_metrics(workdir))
  for key in ('train/loss_recon_thm', 'train/loss_recon_tof', 'train/learning_rate',
              'train/mask_ratio', 'train/mask_ratio_applied', 'train/steps_per_second', 'val/loss', 'val/loss_recon_tof'):
    assert key in keys


def test_report_median_baseline_matches_numpy(finished_run):
  config, workdir, report = finished_run
  assert report['synthetic'] is True
  assert 'synthetic' in report['source']
  recording_set = sources.load_recordings(config.data)
  test_sequences = recording_set.select_subjects(report['split']['test'])
  with_truth = [s for s in test_sequences if s.has_target_truth(('thm', 'tof'))]
  assert report['sequences']['evaluated'] == len(with_truth)
  assert report['sequences']['skipped_without_ground_truth'] == (
      len(test_sequences) - len(with_truth))
  with open(os.path.join(workdir, 'scalers.json')) as f:
    scalers = json.load(f)
  for group, raw in (('thm', 5), ('tof', 320)):
    # In imu_only every observed raw value of the test subjects is scored.
    truth = np.concatenate([s.raw[group] for s in with_truth])
    observed = np.concatenate([s.observed[group] for s in with_truth])
    center = np.asarray(scalers[group]['center'][:raw])
    errors = (np.broadcast_to(center, truth.shape) - truth)[observed]
    entry = report['scenarios']['imu_only']['baselines']['median'][group]
    assert entry['count'] == observed.sum()
    np.testing.assert_allclose(entry['mae'], np.abs(errors).mean(), rtol=1e-9)
    np.testing.assert_allclose(entry['rmse'], np.sqrt((errors ** 2).mean()), rtol=1e-9)
  per_sensor = report['scenarios']['random_mask']['model']['tof']['per_sensor']
  assert sorted(per_sensor) == [f'tof_{i}' for i in range(1, 6)]
  assert sum(v['count'] for v in per_sensor.values()) == (
      report['scenarios']['random_mask']['model']['tof']['count'])


def saved_state(workdir, step):
  """Return the leaves of the state saved at `step` in `workdir`, as a {path: array} dict."""
  manager = checkpointing.ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  restored = manager.restore(step, args=checkpointing.ocp.args.Composite(
      state=checkpointing.ocp.args.StandardRestore()))['state']
  manager.close()
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(restored)}


def test_sigterm_resume_is_bit_exact(finished_run, tmp_path, monkeypatch):
  config, workdir, _ = finished_run
  preempted = str(tmp_path / 'preempted')
  real_rows = train.batch_rows

  def sigterm_at_step_33(step, *args):
    # Called on the prefetch thread, a few steps ahead of the loop, like a real signal.
    if step == 33:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_rows(step, *args)

  monkeypatch.setattr(train, 'batch_rows', sigterm_at_step_33)
  with pytest.raises(preemption.Preempted, match='SIGTERM received: training stopped after '
                     r'step (\d+).*Run the same command again') as stopped:
    train.train_and_evaluate(config, preempted)
  step = stopped.value.step
  # The prefetch thread runs up to 3 batches ahead of the loop, which stops after its current
  # step: mid-epoch, between the periodic checkpoints of steps 20 and 40.
  assert 29 <= step <= 34
  assert stopped.value.exit_status == 128 + signal.SIGTERM
  assert sorted(int(n) for n in os.listdir(os.path.join(preempted, 'checkpoints')))[-1] == step
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler is removed again.

  monkeypatch.setattr(train, 'batch_rows', real_rows)
  train.train_and_evaluate(config, preempted)  # The same command resumes from `step`.
  # Data order, masks, dropout, the mask ramp and the learning-rate schedule all continued
  # exactly: parameters and optimizer state equal the uninterrupted run's bit for bit.
  expected, got = saved_state(workdir, 80), saved_state(preempted, 80)
  assert set(got) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_resume_with_changed_data_is_rejected(finished_run, tmp_path):
  config, workdir, _ = finished_run
  other = str(tmp_path / 'other')
  shutil.copytree(workdir, other)
  changed = tiny_config(num_train_steps=80, mask_start=0.4, mask_end=0.6, mask_epochs=10,
                        **{'loss.kind': 'mae', 'optim.learning_rate': 3e-3,
                           'data.synthetic.seed': 7})
  with pytest.raises(ValueError, match="data.synthetic.seed: 0 in the workdir, 7 now"):
    train.train_and_evaluate(changed, other)
  with open(os.path.join(workdir, 'config.json')) as f, open(
      os.path.join(other, 'config.json')) as g:
    assert f.read() == g.read()  # The rejected launch left the workdir as it was.


def test_train_step_compiles_once_and_ramps_mask():
  config = tiny_config(mask_start=0.2, mask_end=0.8, mask_epochs=1)
  data = train.prepare_data(config)
  model = models.build_model(config, data.input_layouts, data.target_layouts)
  schedule = training.make_schedule(config.optim, 10)
  tx = training.make_optimizer(config.optim, schedule)
  steps = training.Steps(model, tx, schedule, data.input_layouts, data.target_layouts, config,
                         steps_per_epoch=4)
  state = training.create_train_state(
      jax.random.PRNGKey(0), data.train.take(np.arange(1)), model=model, tx=tx,
      input_layouts=data.input_layouts, target_layouts=data.target_layouts,
      prior=config.model.interpolation_prior)
  step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  ratios = []
  for i in range(3):
    rows = train.batch_rows(i, len(data.train), config.batch_size, config.seed)
    state, metrics = step(state, data.train.take(rows))
    ratios.append(float(metrics['mask_ratio']))
  assert int(state.step) == 3
  np.testing.assert_allclose(ratios, [0.2, 0.35, 0.5], rtol=1e-6)
  assert 0.0 < float(metrics['mask_ratio_applied']) < 1.0
  assert np.isfinite(float(metrics['loss']))
  log_var = jax.device_get(metrics['log_var_thm'])
  assert abs(float(log_var)) <= config.model.log_var_bound


def test_batch_rows_cover_epoch():
  rows = [train.batch_rows(s, 20, 4, seed=1) for s in range(5)]
  assert sorted(np.concatenate(rows).tolist()) == list(range(20))
  np.testing.assert_array_equal(train.batch_rows(7, 20, 4, 1), train.batch_rows(7, 20, 4, 1))
  assert len(train.batch_rows(0, 3, 8, 0)) == 8


def test_non_finite_loss_names_step_and_term():
  pending = [{'loss': np.float32(1.0), 'loss_recon_thm': np.float32(0.5)},
             {'loss': np.float32(np.nan), 'loss_recon_thm': np.float32(np.nan)}]
  with pytest.raises(FloatingPointError,
                     match=r'loss_recon_thm = nan, loss = nan at step 12.*step 10\).*nonfinite'):
    train.check_finite(pending, 10, 10)
  # A step that the step function skipped is counted, not an error, and left out of the means.
  pending[1]['skipped'] = np.float32(1.0)
  pending[0]['skipped'] = np.float32(0.0)
  train.check_finite(pending, 10, 10)
  assert train.mean_metrics(pending) == {'loss': 1.0, 'loss_recon_thm': 0.5, 'skipped': 1.0}


def test_processes_window_their_own_training_sequences(monkeypatch):
  config = tiny_config()
  whole = train.prepare_data(config)
  shares = []
  for process in range(2):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda process=process: process)
    shares.append(train.prepare_data(config))
  monkeypatch.undo()
  ids = [[s.sequence_id for s in share.sequences['train']] for share in shares]
  all_ids = [s.sequence_id for s in whole.sequences['train']]
  assert sorted(ids[0] + ids[1]) == sorted(all_ids)
  assert not set(ids[0]) & set(ids[1])
  assert len(shares[0].train) + len(shares[1].train) == len(whole.train)
  longest = max(s.length for s in whole.sequences['train'])
  assert abs(len(shares[0].train) - len(shares[1].train)) <= longest
  assert shares[0].num_train_windows == shares[1].num_train_windows == len(whole.train)
  for share in shares:
    # The scalers come from every training sequence, and evaluation uses every window.
    assert scaling_json(share.scalers) == scaling_json(whole.scalers)
    np.testing.assert_array_equal(share.validation.batch['values']['thm'],
                                  whole.validation.batch['values']['thm'])
  # Each process draws its own rows, half of the global batch, from its own windows.
  rows = [train.batch_rows(5, len(share.train), 4, 0, process, 2)
          for process, share in enumerate(shares)]
  assert all(len(r) == 4 and r.max() < len(share.train) for r, share in zip(rows, shares))
  np.testing.assert_array_equal(train.batch_rows(5, 40, 4, 0), train.batch_rows(5, 40, 4, 0, 0, 1))


def test_training_share_balances_window_counts():
  # Greedy by window count: each sequence goes to the share with the fewest windows so far.
  assert train.training_share([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
  assert train.training_share([2, 2, 3, 1], 3) == [[0, 3], [1], [2]]


def scaling_json(scalers):
  return json.dumps(scaling.scalers_to_json(scalers))


def test_skip_mode_drops_nonfinite_update():
  config = tiny_config(nonfinite='skip')
  data = train.prepare_data(config)
  steps = train.make_steps(config, data)[0]
  init, example = train.state_initializer(steps, data)
  step_fn = jax.jit(steps.train_step)
  batches = [data.train.take(train.batch_rows(s, len(data.train), config.batch_size,
                                              config.seed)) for s in (0, 1)]
  group = data.target_layouts[0].name
  observed = np.argwhere(batches[1]['observed'][group])[0]
  batches[1]['values'][group][tuple(observed)] = np.inf  # An observed target value of inf.
  after_good, metrics = step_fn(init(jax.random.PRNGKey(0), example), batches[0])
  assert int(after_good.skipped) == 0
  assert float(metrics['skipped']) == 0.0
  after_bad, metrics = step_fn(after_good, batches[1])
  assert float(metrics['skipped']) == 1.0
  assert not np.isfinite(float(metrics['loss']))
  assert (int(after_bad.step), int(after_bad.skipped)) == (2, 1)
  for kept, before in zip(jax.tree.leaves((after_bad.params, after_bad.opt_state)),
                          jax.tree.leaves((after_good.params, after_good.opt_state))):
    np.testing.assert_array_equal(kept, before)


def one_step(config, data, state=None):
  model = models.build_model(config, data.input_layouts, data.target_layouts)
  schedule = training.make_schedule(config.optim, 10)
  tx = training.make_optimizer(config.optim, schedule)
  quaternions = {l.name: augment.quaternion_channels(l, data.scalers[l.name])
                 for l in data.input_layouts}
  steps = training.Steps(model, tx, schedule, data.input_layouts, data.target_layouts, config,
                         steps_per_epoch=4, total_steps=10, quaternions=quaternions)
  if state is None:
    queue_size = config.contrastive.queue_size if config.lambda_contrastive > 0 else 0
    state = training.create_train_state(
        jax.random.PRNGKey(0), data.train.take(np.arange(1)), model=model, tx=tx,
        input_layouts=data.input_layouts, target_layouts=data.target_layouts,
        prior=config.model.interpolation_prior, queue_size=queue_size)
  rows = train.batch_rows(0, len(data.train), config.batch_size, config.seed)
  return state, jax.jit(steps.train_step)(state, data.train.take(rows))


def test_zero_lambda_cons_equals_phase_two():
  phase2 = tiny_config(mask_start=0.3, mask_end=0.75, mask_epochs=1)
  phase3 = tiny_config(mask_start=0.3, mask_end=0.75, mask_epochs=1, lambda_cons=0.0,
                       **{'consistency.positions': 'all'})
  data = train.prepare_data(phase2)
  state, (after2, metrics2) = one_step(phase2, data)
  _, (after3, metrics3) = one_step(phase3, data, state)
  assert float(metrics2['loss']) == float(metrics3['loss'])
  for a, b in zip(jax.tree.leaves(after2.params), jax.tree.leaves(after3.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_two_views_log_consistency_terms():
  config = tiny_config(lambda_cons=0.5)
  data = train.prepare_data(config)
  _, (state, metrics) = one_step(config, data)
  assert float(metrics['count_cons']) > 0
  assert float(metrics['loss_cons']) > 0
  assert np.isfinite(float(metrics['loss']))
  assert int(state.step) == 1


# Phase 6 contains every term of phases 3 to 5, and phase 0 is the plain loss. Phases 1 to 5 are
# checked by tracing alone below, and phases 1 and 2 by test_train_step_compiles_once_and_ramps_mask.
@pytest.mark.parametrize('phase', ['phase0', 'phase6'])
def test_train_step_traces_once_per_phase(phase):
  # The step is jitted as train.build_steps does it, with the trace counter inside.
  chex.clear_trace_counter()
  config = tiny_config(phase, **{'contrastive.queue_size': 16})
  data = train.prepare_data(config)
  steps, _ = train.make_steps(config, data)
  init, example = train.state_initializer(steps, data)
  mesh = sharding.make_mesh()
  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(0), example)
  step = jax.jit(chex.assert_max_traces(steps.train_step, n=1),
                 in_shardings=(replicated, batched), out_shardings=(replicated, replicated),
                 donate_argnums=0)
  for batch in train.train_batches(config, data, mesh, 0, 3):
    state, metrics = step(state, batch)
  assert int(state.step) == 3
  assert np.isfinite(float(metrics['loss']))
  # Evaluation pads its last batch, so one trace serves every batch of every split.
  predict_fn = evaluation.make_predict_fns(steps, config)['random_mask']
  predict = jax.jit(chex.assert_max_traces(predict_fn, n=1),
                    in_shardings=(replicated, batched, None))
  for split in (data.validation, data.test):
    evaluation.predict_windows(predict, state.params, split, 4, mesh, jax.random.PRNGKey(1))


@pytest.mark.parametrize('phase', ['phase1', 'phase2', 'phase3', 'phase4', 'phase5'])
def test_train_step_output_matches_its_input_types(phase):
  # A step whose new state had another shape, dtype or weak type than the old one would be
  # traced and compiled again at the next step. Tracing alone shows it, without compiling.
  config = tiny_config(phase, **{'contrastive.queue_size': 16})
  data = train.prepare_data(config)
  steps, _ = train.make_steps(config, data)
  init, example = train.state_initializer(steps, data)
  state = jax.eval_shape(init, jax.random.PRNGKey(0), example)
  batch = next(train.train_batches(config, data, sharding.make_mesh(), 0, 1))
  new_state, _ = jax.eval_shape(steps.train_step, state, batch)
  describe = lambda tree: [(jax.tree_util.keystr(p), x.shape, x.dtype, x.weak_type)
                           for p, x in jax.tree_util.tree_leaves_with_path(tree)]
  assert describe(new_state) == describe(state)
