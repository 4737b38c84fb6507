"""Phase 4 inside the train step: momentum encoder, queue, keys, checkpoints and devices."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from imputer import augment
from imputer import checkpointing
from imputer import models
from imputer import run_config
from imputer import train
from imputer import training
from tests import test_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phase4_config(**overrides):
  settings = {'lambda_cons': 0.1, 'lambda_contrastive': 0.5, 'contrastive.queue_size': 20,
              'contrastive.momentum': 0.9}
  settings.update(overrides)
  return test_train.tiny_config(**settings)


@pytest.fixture(scope='module')
def setup():
  config = phase4_config(**{'augment.warp_strength': 0.0, 'augment.jitter_sigma': 0.0})
  data = train.prepare_data(config)
  model = models.build_model(config, data.input_layouts, data.target_layouts)
  schedule = training.make_schedule(config.optim, 10)
  tx = training.make_optimizer(config.optim, schedule)
  steps = training.Steps(model, tx, schedule, data.input_layouts, data.target_layouts, config,
                         steps_per_epoch=4, total_steps=10,
                         quaternions={l.name: augment.quaternion_channels(l, data.scalers[l.name])
                                      for l in data.input_layouts})
  state = training.create_train_state(
      jax.random.PRNGKey(0), data.train.take(np.arange(1)), model=model, tx=tx,
      input_layouts=data.input_layouts, target_layouts=data.target_layouts,
      prior=config.model.interpolation_prior, queue_size=config.contrastive.queue_size)
  return config, data, model, jax.jit(steps.train_step), state


def batch(data, config, step):
  return data.train.take(train.batch_rows(step, len(data.train), config.batch_size,
                                          config.seed))


def test_momentum_encoder_copies_trunk(setup):
  _, _, _, _, state = setup
  assert set(state.ema_params) == {'input_projection', 'local_conv', 'encoder',
                                        'shared_decoder', 'projection_head'}
  assert 'projection_head' in state.params
  for name, subtree in state.ema_params.items():
    for kept, online in zip(jax.tree.leaves(subtree), jax.tree.leaves(state.params[name])):
      np.testing.assert_array_equal(kept, online)
      assert kept.unsafe_buffer_pointer() != online.unsafe_buffer_pointer()
  assert state.queue.shape == (20, 64)
  assert (int(state.queue_ptr), int(state.queue_filled)) == (0, 0)


def test_steps_fill_queue_and_ema(setup):
  config, data, model, step, state = setup
  first = batch(data, config, 0)
  before = jax.device_get(state)
  state, metrics = step(state, first)

  # With no warp and no jitter, view B is the IMU-only input itself, so the queue's first
  # rows are the old momentum encoder's keys of the batch, in row order.
  inputs = training.imu_only_inputs(
      first['valid'], {l.name: first['values'][l.name] for l in data.input_layouts},
      {l.name: first['observed'][l.name] for l in data.input_layouts}, data.target_layouts,
      config.model.interpolation_prior)
  keys = model.apply({'params': before.ema_params}, inputs, output='projection')
  np.testing.assert_allclose(state.queue[:8], keys['projection'], atol=1e-5)
  np.testing.assert_array_equal(state.queue[8:], 0.0)
  assert (int(state.queue_ptr), int(state.queue_filled)) == (8, 8)

  # theta_k <- m * theta_k + (1 - m) * theta_q with the updated online parameters.
  for name in before.ema_params:
    for old, new, online in zip(jax.tree.leaves(before.ema_params[name]),
                                jax.tree.leaves(state.ema_params[name]),
                                jax.tree.leaves(state.params[name])):
      np.testing.assert_allclose(new, 0.9 * old + 0.1 * np.asarray(online), atol=1e-6)
  assert float(metrics['queue_fill']) == 0.0
  assert abs(float(metrics['loss_contrastive'])) < 1e-6  # No negatives yet.

  fills = []
  for i in (1, 2):
    state, metrics = step(state, batch(data, config, i))
    fills.append(float(metrics['queue_fill']))
  np.testing.assert_allclose(fills, [0.4, 0.8], rtol=1e-6)

  # 24 keys into 20 slots: the last batch wrapped, so the pointer is at 4 and all is filled.
  assert (int(state.queue_ptr), int(state.queue_filled)) == (4, 20)
  np.testing.assert_allclose(np.linalg.norm(state.queue, axis=1), 1.0, atol=1e-5)
  assert float(metrics['loss_contrastive']) > 0.0
  assert -1.0 <= float(metrics['contrastive_negative_cosine']) <= 1.0
  total = (float(metrics['loss']) - 0.5 * float(metrics['loss_contrastive']))
  assert np.isfinite(total)


def test_queue_checkpoint_round_trip(setup, tmp_path):
  config, data, _, step, state = setup
  for i in range(3):
    state, _ = step(state, batch(data, config, i))
  checkpoints = checkpointing.Checkpoints(str(tmp_path), 2)
  checkpoints.save(3, state, {'thm': {}})
  checkpoints.wait()
  fresh = jax.tree.map(np.zeros_like, jax.device_get(state))
  restored, scalers = checkpoints.restore_latest(checkpointing.abstract_like(
      jax.tree.map(jax.numpy.asarray, fresh)))
  checkpoints.close()
  assert scalers == {'thm': {}}
  saved = jax.tree_util.tree_leaves_with_path(state)
  loaded = jax.tree_util.tree_leaves_with_path(restored)
  assert [jax.tree_util.keystr(p) for p, _ in saved] == [jax.tree_util.keystr(p) for p, _ in loaded]
  for (path, value), (_, got) in zip(saved, loaded):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(value),
                                  err_msg=jax.tree_util.keystr(path))
  assert int(restored.queue_ptr) == 4


def run_steps(out, devices, *flags):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS='cpu')
  done = subprocess.run([sys.executable, '-m', 'tests.phase4_steps', str(out), *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return dict(np.load(out))


def test_devices_and_restores_match(tmp_path):
  """1, 2 and 4 devices train alike, and checkpoints move between device counts."""
  two, four = str(tmp_path / 'two_devices'), str(tmp_path / 'four_devices')
  results = {
      '1 device': run_steps(tmp_path / 'a.npz', 1),
      # 2 devices, saving the state of step 2 on the way.
      '2 devices': run_steps(tmp_path / 'b.npz', 2, '--save', two, '2'),
      # 4 devices from the 2-device checkpoint of step 2, saving step 3 on the way.
      '4 devices, restored from 2': run_steps(tmp_path / 'c.npz', 4, '--restore', two, '2',
                                              '--save', four, '3'),
      # 1 device from the 4-device checkpoint of step 3.
      '1 device, restored from 4': run_steps(tmp_path / 'd.npz', 1, '--restore', four, '3'),
  }
  counts = [(int(r['devices']), int(r['first'])) for r in results.values()]
  assert counts == [(1, 0), (2, 0), (4, 2), (1, 3)]
  reference = results['1 device']
  # The attention key bias adds the same amount to every logit of a query, so softmax
  # cancels it and its true gradient is exactly 0. What reaches it is rounding noise, which
  # Adam scales up to full-size steps, so its values depend on the summation order of the
  # devices. Every other leaf must match.
  names = [n for n in reference
           if n not in ('devices', 'first') and "['key']['bias']" not in n]
  assert any('queue' in n for n in names)
  assert any('ema_params' in n for n in names)
  for label, result in results.items():
    assert set(result) == set(reference), label
    for name in names:
      np.testing.assert_allclose(result[name], reference[name], rtol=2e-4, atol=2e-5,
                                 err_msg=f'{label}: {name}')


def test_imu_only_inputs_match_general(setup):
  config, data, _, _, _ = setup
  batch_ = data.train.take(np.arange(4))
  hidden = {l.name: np.zeros(batch_['values'][l.name].shape[:2] + (l.num_raw,), np.float32)
            for l in data.target_layouts}
  general = training.model_inputs(batch_, data.input_layouts, data.target_layouts, hidden,
                                  prior=True)
  direct = training.imu_only_inputs(
      batch_['valid'], {l.name: batch_['values'][l.name] for l in data.input_layouts},
      {l.name: batch_['observed'][l.name] for l in data.input_layouts}, data.target_layouts,
      prior=True)
  assert jax.tree.structure(general) == jax.tree.structure(direct)
  for a, b in zip(jax.tree.leaves(general), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_config_rejects_small_queue():
  config = phase4_config(**{'contrastive.queue_size': 4})
  with pytest.raises(ValueError, match=r'contrastive.queue_size=4 .*batch_size \(8\)'):
    run_config.validate(config)
  config = phase4_config(**{'contrastive.momentum_schedule': 'step'})
  with pytest.raises(ValueError, match="contrastive.momentum_schedule='step'"):
    run_config.validate(config)


def test_state_without_queue_saves_no_empty_fields(setup, tmp_path):
  _, _, _, _, state = setup
  plain = state.replace(ema_params=None, queue=None, queue_ptr=None,
                        queue_filled=None)
  assert sorted(checkpointing.state_tree(plain)) == ['opt_state', 'params', 'rng', 'step']
  checkpoints = checkpointing.Checkpoints(str(tmp_path), 2)
  checkpoints.save(1, plain, {})
  checkpoints.wait()
  restored, _ = checkpoints.restore_latest(checkpointing.abstract_like(plain))
  checkpoints.close()
  assert restored.queue is None
  assert restored.ema_params is None
  np.testing.assert_array_equal(restored.rng, plain.rng)
