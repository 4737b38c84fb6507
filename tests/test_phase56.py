"""Positional and sensor-ID embeddings, auxiliary denoising and the total loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imputer import denoising
from imputer import models
from imputer import train
from tests import test_train

WINDOW = 12
# Three input channels and five thermopiles, one token each in the sensor stage.
SENSORS = tuple([('input', 'acc', (c,)) for c in range(3)]
                + [('target', 'thm', (s,)) for s in range(5)])


def make_inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  visible = (rng.random((batch, WINDOW, 5)) < 0.5).astype(np.float32)
  return {
      'valid': np.ones((batch, WINDOW), bool),
      'inputs': {'acc': rng.normal(size=(batch, WINDOW, 3)).astype(np.float32)},
      'inputs_observed': {'acc': np.ones((batch, WINDOW, 3), bool)},
      'targets': {'thm': rng.normal(size=(batch, WINDOW, 5)).astype(np.float32) * visible},
      'targets_visible': {'thm': visible},
  }


def make_model(**kwargs):
  settings = dict(targets=(('thm', 5),), hidden_dim=16, encoder_layers=1, decoder_layers=1,
                  num_heads=2, dropout=0.0, conv_kernel=1, window=WINDOW,
                  inputs=(('acc', 3),))
  settings.update(kwargs)
  return models.MaskedImputer(**settings)


def permute_time(inputs, order):
  return jax.tree.map(lambda x: x[:, order], inputs)


@pytest.mark.parametrize('sensors', [(), SENSORS])
def test_no_positions_time_equivariant(sensors):
  # Without positions, convolution or prior, each layer treats timesteps as a set.
  model = make_model(sensors=sensors)
  inputs = make_inputs()
  params = model.init(jax.random.PRNGKey(0), inputs)
  order = np.random.default_rng(1).permutation(WINDOW)
  out = model.apply(params, inputs)['recon']['thm']
  permuted = model.apply(params, permute_time(inputs, order))['recon']['thm']
  np.testing.assert_allclose(permuted, np.asarray(out)[:, order], atol=1e-5)


def test_positions_break_equivariance():
  model = make_model(positional_embedding=True)
  inputs = make_inputs()
  params = model.init(jax.random.PRNGKey(0), inputs)
  assert params['params']['positional_embedding'].shape == (WINDOW, 16)
  order = np.random.default_rng(1).permutation(WINDOW)
  out = model.apply(params, inputs)['recon']['thm']
  permuted = model.apply(params, permute_time(inputs, order))['recon']['thm']
  assert np.abs(np.asarray(permuted) - np.asarray(out)[:, order]).max() > 1e-3


def test_sensor_ids_change_output():
  model = make_model(sensors=SENSORS)
  inputs = make_inputs()
  params = model.init(jax.random.PRNGKey(0), inputs)
  table = params['params']['sensor_mixer']['sensor_id_embedding']
  assert table.shape == (len(SENSORS), 16)
  base = np.asarray(model.apply(params, inputs)['recon']['thm'])
  # A random direction: a shift by the same amount in every feature would vanish in the
  # LayerNorms, which remove each token's mean.
  direction = np.random.default_rng(2).normal(size=16).astype(np.float32)
  changes = []
  for token in range(len(SENSORS)):
    moved = jax.tree.map(lambda x: x, params)
    moved['params']['sensor_mixer']['sensor_id_embedding'] = table.at[token].add(direction)
    changes.append(np.abs(np.asarray(model.apply(moved, inputs)['recon']['thm']) - base).max())
  assert min(changes) > 1e-4, changes


def test_sensor_ids_separate_equal_readings():
  # Two thermopiles with the same reading give the same token content. Only their ID
  # embeddings tell them apart, so swapping the IDs changes the output.
  model = make_model(sensors=SENSORS)
  inputs = make_inputs()
  inputs['targets']['thm'][..., 1] = inputs['targets']['thm'][..., 0]
  inputs['targets_visible']['thm'][..., 1] = inputs['targets_visible']['thm'][..., 0]
  params = model.init(jax.random.PRNGKey(0), inputs)
  table = params['params']['sensor_mixer']['sensor_id_embedding']
  swapped = jax.tree.map(lambda x: x, params)
  swapped['params']['sensor_mixer']['sensor_id_embedding'] = table.at[np.array([3, 4])].set(table[np.array([4, 3])])
  a = np.asarray(model.apply(params, inputs)['recon']['thm'])
  b = np.asarray(model.apply(swapped, inputs)['recon']['thm'])
  assert np.abs(a - b).max() > 1e-4


def test_sensor_tokens_follow_layouts():
  config = test_train.tiny_config()
  data = train.prepare_data(config)
  tokens = models.sensor_tokens(data.input_layouts, data.target_layouts)
  roles = [t[0] for t in tokens]
  assert roles.count('input') == 7  # acc_x..rot_z
  assert [t[1] for t in tokens if t[0] == 'target'] == ['thm'] * 5 + ['tof'] * 5
  assert tokens[-1][2] == tuple(range(256, 320))  # ToF sensor 5: pixels 256..319.


def test_corruption_ratio_and_places():
  rng = np.random.default_rng(0)
  observed = rng.random((64, 50, 20)) < 0.8
  valid = np.ones((64, 50), bool)
  valid[:, 40:] = False
  values = np.where(observed, rng.normal(size=observed.shape), 0.0).astype(np.float32)
  corrupted, masks = denoising.corrupt(jax.random.PRNGKey(3), {'imu': jnp.asarray(values)},
                                       {'imu': jnp.asarray(observed)}, jnp.asarray(valid),
                                       0.1, 0.5)
  mask = np.asarray(masks['imu'])
  eligible = observed & valid[..., None]
  assert not (mask & ~eligible).any()
  np.testing.assert_allclose(mask.sum() / eligible.sum(), 0.1, atol=0.005)
  changed = np.asarray(corrupted['imu']) != values
  np.testing.assert_array_equal(changed, mask)
  noise = (np.asarray(corrupted['imu']) - values)[mask]
  np.testing.assert_allclose(noise.std(), 0.5, rtol=0.03)


def test_denoise_loss_zero_for_clean_head():
  rng = np.random.default_rng(0)
  clean = {'imu': rng.normal(size=(4, 8, 3)).astype(np.float32)}
  weights = {'imu': rng.random((4, 8, 3)) < 0.3}
  loss, count = denoising.denoise_loss(clean, clean, weights)
  assert float(loss) == 0.0
  assert float(count) == weights['imu'].sum()
  noisy = {'imu': clean['imu'] + 1.5}
  loss, _ = denoising.denoise_loss(noisy, clean, weights)
  np.testing.assert_allclose(float(loss), 2.25, rtol=1e-6)


def phase6_config(**overrides):
  settings = {'lambda_cons': 0.1, 'lambda_contrastive': 0.3, 'lambda_denoise': 0.7,
              'contrastive.queue_size': 16, 'model.positional_embedding': True,
              'model.sensor_embedding': True}
  settings.update(overrides)
  return test_train.tiny_config(**settings)


@pytest.fixture(scope='module')
def data():
  return train.prepare_data(phase6_config())


def test_total_loss_weighted_sum(data):
  config = phase6_config()
  _, (_, metrics) = test_train.one_step(config, data)
  m = {k: float(v) for k, v in metrics.items()}
  expected = (m['loss_recon'] + 0.1 * m['loss_cons'] + 0.7 * m['loss_denoise']
              + 0.3 * m['loss_contrastive'])
  np.testing.assert_allclose(m['loss'], expected, rtol=1e-6)
  assert m['loss_denoise'] > 0
  assert 0.05 < m['denoise_ratio_applied'] < 0.15


def test_switched_off_phase6_is_phase3(data):
  phase3 = test_train.tiny_config(lambda_cons=0.1)
  off = phase6_config(lambda_contrastive=0.0, lambda_denoise=0.0,
                      **{'model.positional_embedding': False,
                         'model.sensor_embedding': False})
  state, (after3, metrics3) = test_train.one_step(phase3, data)
  _, (after6, metrics6) = test_train.one_step(off, data, state)
  assert float(metrics3['loss']) == float(metrics6['loss'])
  for a, b in zip(jax.tree.leaves(after3.params), jax.tree.leaves(after6.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
