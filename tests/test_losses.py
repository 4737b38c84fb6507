"""Loss forms against numpy, including a group with nothing to score."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imputer import losses

PRED = np.array([[0.5, -1.0, 3.0], [2.0, 0.0, -2.5]], np.float32)
TARGET = np.array([[0.0, 1.0, 0.5], [2.5, 0.0, 1.0]], np.float32)
WEIGHT = np.array([[1, 0, 1], [1, 1, 0]], bool)


def numpy_error(kind, delta=1.0):
  d = PRED.astype(np.float64) - TARGET
  if kind == 'mse':
    return d * d
  if kind == 'mae':
    return np.abs(d)
  a = np.abs(d)
  return np.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta))


@pytest.mark.parametrize('kind', ['mse', 'mae', 'huber'])
def test_plain_masked_loss_matches_numpy(kind):
  error = losses.elementwise_error(kind, PRED, TARGET, 1.0)
  value, count = losses.masked_mean(error, WEIGHT)
  expected = numpy_error(kind)[WEIGHT].mean()
  np.testing.assert_allclose(float(value), expected, rtol=1e-6)
  assert float(count) == WEIGHT.sum()


def test_huber_uses_delta():
  error = losses.elementwise_error('huber', PRED, TARGET, 0.3)
  np.testing.assert_allclose(np.asarray(error), numpy_error('huber', 0.3), rtol=1e-6)


def loss_config(kind):
  return ml_collections.ConfigDict({'kind': kind, 'huber_delta': 1.0})


@pytest.mark.parametrize('kind,form', [
    ('conf_mse', lambda l, s: 0.5 * np.exp(-s) * l + 0.5 * s),
    ('conf_mae', lambda l, s: np.exp(-s) * l + s),
    ('conf_huber', lambda l, s: np.exp(-s) * l + s),
])
def test_conf_forms_match_hand_computation(kind, form):
  s = 0.7
  outputs = {'recon': {'g': PRED}, 'log_var': {'g': jnp.float32(s)}}
  total, terms = losses.reconstruction_loss(
      loss_config(kind), outputs, {'g': TARGET}, {'g': WEIGHT}, {})
  plain = numpy_error(kind.removeprefix('conf_'))[WEIGHT].mean()
  np.testing.assert_allclose(float(terms['loss_recon_g']), plain, rtol=1e-6)
  np.testing.assert_allclose(float(total), form(plain, s), rtol=1e-6)


@pytest.mark.parametrize('kind', ['mse', 'mae', 'huber', 'conf_mse', 'conf_mae', 'conf_huber'])
def test_empty_group_contributes_zero_with_finite_gradients(kind):
  empty = np.zeros_like(WEIGHT)

  def total(pred, s):
    outputs = {'recon': {'a': pred, 'b': pred}, 'log_var': {'a': s, 'b': s * 2.0}}
    value, _ = losses.reconstruction_loss(
        loss_config(kind), outputs, {'a': TARGET, 'b': TARGET}, {'a': WEIGHT, 'b': empty}, {})
    return value

  def only_a(pred, s):
    outputs = {'recon': {'a': pred}, 'log_var': {'a': s}}
    return losses.reconstruction_loss(
        loss_config(kind), outputs, {'a': TARGET}, {'a': WEIGHT}, {})[0]

  s = jnp.float32(0.3)
  np.testing.assert_allclose(float(total(PRED, s)), float(only_a(PRED, s)), rtol=1e-6)
  grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(PRED), s)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()

  def all_empty(pred, s):
    outputs = {'recon': {'b': pred}, 'log_var': {'b': s}}
    return losses.reconstruction_loss(
        loss_config(kind), outputs, {'b': TARGET}, {'b': empty}, {})[0]

  assert float(all_empty(PRED, s)) == 0.0
  grads = jax.grad(all_empty, argnums=(0, 1))(jnp.asarray(PRED), s)
  for g in jax.tree.leaves(grads):
    assert np.all(np.asarray(g) == 0.0)


def test_group_weights_scale_each_group():
  outputs = {'recon': {'a': PRED, 'b': PRED}}
  cfg = loss_config('mae')
  total, terms = losses.reconstruction_loss(
      cfg, outputs, {'a': TARGET, 'b': TARGET}, {'a': WEIGHT, 'b': WEIGHT}, {'b': 0.25})
  np.testing.assert_allclose(float(total), 1.25 * float(terms['loss_recon_a']), rtol=1e-6)


def test_group_weights_parse_and_reject():
  assert losses.parse_group_weights('thm=1, tof=0.5', ['thm', 'tof']) == {'thm': 1.0, 'tof': 0.5}
  with pytest.raises(ValueError, match='gyro'):
    losses.parse_group_weights('gyro=1', ['thm', 'tof'])
  with pytest.raises(ValueError, match='not a number'):
    losses.parse_group_weights('thm=heavy', ['thm', 'tof'])
  with pytest.raises(ValueError, match='twice'):
    losses.parse_group_weights('thm=1,thm=2', ['thm', 'tof'])
  for bad in ('thm=-1', 'thm=nan', 'thm=inf'):
    with pytest.raises(ValueError, match='finite number of 0 or more'):
      losses.parse_group_weights(bad, ['thm', 'tof'])
  with pytest.raises(ValueError, match='nothing would be trained'):
    losses.parse_group_weights('thm=0,tof=0', ['thm', 'tof'])


def test_unknown_loss_kind_is_rejected():
  with pytest.raises(ValueError, match='loss.kind'):
    losses.elementwise_error('l3', PRED, TARGET)


def test_consistency_positions_on_hand_built_masks():
  observed = np.array([[True, True, True, True, False]])
  hidden_a = np.array([[False, True, False, True, False]])
  hidden_b = np.array([[False, False, True, True, True]])
  expected = {'both_visible': [[True, False, False, False, False]],
              'both_hidden': [[False, False, False, True, False]],
              'all': [[True, True, True, True, False]]}
  for kind, mask in expected.items():
    got = np.asarray(losses.consistency_positions(kind, observed, hidden_a, hidden_b))
    np.testing.assert_array_equal(got, mask)
  with pytest.raises(ValueError, match='consistency.positions'):
    losses.consistency_positions('some', observed, hidden_a, hidden_b)


def test_consistency_loss_matches_numpy():
  recon_b = PRED + np.float32(0.5) * TARGET
  value, count = losses.consistency_loss({'g': PRED}, {'g': recon_b}, {'g': WEIGHT})
  np.testing.assert_allclose(float(value), ((0.5 * TARGET) ** 2)[WEIGHT].mean(), rtol=1e-6)
  assert float(count) == WEIGHT.sum()
  empty, none = losses.consistency_loss({'g': PRED}, {'g': recon_b},
                                        {'g': np.zeros_like(WEIGHT)})
  assert float(empty) == 0.0
  assert float(none) == 0.0


@pytest.mark.parametrize('kind', ['conf_mse', 'conf_mae'])
def test_per_value_log_variance_matches_hand_computation(kind):
  s = np.array([[0.2, -0.4, 1.1], [-0.9, 0.3, 0.5]], np.float32)
  outputs = {'recon': {'g': PRED}, 'log_var': {'g': jnp.asarray(s)}}
  total, terms = losses.reconstruction_loss(
      loss_config(kind), outputs, {'g': TARGET}, {'g': WEIGHT}, {})
  error = numpy_error(kind.removeprefix('conf_'))
  if kind == 'conf_mse':
    per_value = 0.5 * np.exp(-s) * error + 0.5 * s
  else:
    per_value = np.exp(-s) * error + s
  np.testing.assert_allclose(float(total), per_value[WEIGHT].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(terms['log_var_g']), s[WEIGHT].mean(), rtol=1e-6)
  # A constant per-value s gives the per-group form.
  constant = {'recon': {'g': PRED}, 'log_var': {'g': jnp.full(s.shape, 0.7)}}
  scalar = {'recon': {'g': PRED}, 'log_var': {'g': jnp.float32(0.7)}}
  a = losses.reconstruction_loss(loss_config(kind), constant, {'g': TARGET}, {'g': WEIGHT}, {})
  b = losses.reconstruction_loss(loss_config(kind), scalar, {'g': TARGET}, {'g': WEIGHT}, {})
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)
  # Nothing to score: exactly 0.
  empty = losses.reconstruction_loss(loss_config(kind), outputs, {'g': TARGET},
                                     {'g': np.zeros_like(WEIGHT)}, {})
  assert float(empty[0]) == 0.0


def test_predictive_std_of_each_distribution():
  np.testing.assert_allclose(losses.predictive_std('conf_mse', np.log(4.0)), 2.0)
  np.testing.assert_allclose(losses.predictive_std('conf_mae', np.log(3.0)), 3.0 * np.sqrt(2.0))
