"""The masked imputer's outputs: shapes, padding, the prior and the bounded log-variance."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imputer import interpolation
from imputer import models

TARGETS = (('thm', 17), ('tof', 320))
RAW = {'thm': 5, 'tof': 320}


def make_inputs(seed=0, batch=2, window=8, prior=True):
  rng = np.random.default_rng(seed)
  visible = {g: (rng.random((batch, window, n)) < 0.5).astype(np.float32) for g, n in RAW.items()}
  targets = {g: rng.normal(size=(batch, window, n)).astype(np.float32) * visible[g]
             for g, n in RAW.items()}
  valid = np.ones((batch, window), bool)
  valid[1, 5:] = False
  for g in RAW:
    visible[g][1, 5:] = 0.0
    targets[g][1, 5:] = 0.0
  inputs = {
      'valid': valid,
      'inputs': {'imu': rng.normal(size=(batch, window, 20)).astype(np.float32)},
      'inputs_observed': {'imu': np.ones((batch, window, 20), bool)},
      'targets': targets, 'targets_visible': visible,
  }
  if prior:
    inputs['targets_prior'] = {
        g: interpolation.interpolate_visible(targets[g], visible[g]) for g in RAW}
  return inputs


def init(model, inputs):
  return model.init({'params': jax.random.PRNGKey(0)}, inputs)['params']


def test_shared_and_dual_output_shapes():
  inputs = make_inputs()
  for decoder, trunk in (('shared', {'shared_decoder'}), ('dual', {'decoder_thm', 'decoder_tof'})):
    model = models.MaskedImputer(TARGETS, hidden_dim=16, num_heads=2, decoder=decoder)
    params = init(model, inputs)
    out = model.apply({'params': params}, inputs)
    assert out['recon']['thm'].shape == (2, 8, 17)
    assert out['recon']['tof'].shape == (2, 8, 320)
    assert trunk <= set(params)
    assert {'head_thm', 'head_tof'} <= set(params)


def test_padding_content_does_not_change_outputs():
  model = models.MaskedImputer(TARGETS, hidden_dim=16, num_heads=2, decoder_type='transformer')
  inputs = make_inputs()
  params = init(model, inputs)
  before = model.apply({'params': params}, inputs)['recon']
  changed = jax.tree.map(lambda x: x, inputs)
  changed['inputs']['imu'] = changed['inputs']['imu'].copy()
  changed['inputs']['imu'][1, 5:] = 1e3
  after = model.apply({'params': params}, changed)['recon']
  for g in RAW:
    np.testing.assert_allclose(after[g][1, :5], before[g][1, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after[g][0], before[g][0], rtol=1e-5, atol=1e-5)


def test_open_gate_with_silent_head_returns_prior():
  model = models.MaskedImputer(TARGETS, hidden_dim=16, num_heads=2)
  inputs = make_inputs()
  params = init(model, inputs)
  params = jax.tree.map(lambda x: x, params)
  for g in RAW:
    params[f'head_{g}'] = jax.tree.map(jnp.zeros_like, params[f'head_{g}'])
    gate = params[f'prior_gate_{g}']
    params[f'prior_gate_{g}'] = {'kernel': jnp.zeros_like(gate['kernel']),
                                 'bias': jnp.full_like(gate['bias'], 50.0)}
  out = model.apply({'params': params}, inputs)['recon']
  for g, n in RAW.items():
    np.testing.assert_allclose(out[g][..., :n], inputs['targets_prior'][g], atol=1e-5)
    np.testing.assert_allclose(out[g][..., n:], 0.0)


def test_closed_gate_returns_visible_mean():
  model = models.MaskedImputer(TARGETS, hidden_dim=16, num_heads=2)
  inputs = make_inputs()
  params = init(model, inputs)
  params = jax.tree.map(lambda x: x, params)
  params['head_thm'] = jax.tree.map(jnp.zeros_like, params['head_thm'])
  gate = params['prior_gate_thm']
  params['prior_gate_thm'] = {'kernel': jnp.zeros_like(gate['kernel']),
                              'bias': jnp.full_like(gate['bias'], -50.0)}
  out = np.asarray(model.apply({'params': params}, inputs)['recon']['thm'])
  values, visible = inputs['targets']['thm'], inputs['targets_visible']['thm']
  mean = (values * visible).sum(1) / np.maximum(visible.sum(1), 1)
  np.testing.assert_allclose(out[..., :5], np.broadcast_to(mean[:, None], out[..., :5].shape),
                             atol=1e-5)


def test_log_variance_is_bounded():
  model = models.MaskedImputer(TARGETS, hidden_dim=16, num_heads=2, learn_log_var=True,
                               log_var_bound=3.0)
  inputs = make_inputs(prior=False)
  params = init(model, inputs)
  params = dict(params, log_var_thm=jnp.float32(100.0), log_var_tof=jnp.float32(-100.0))
  out = model.apply({'params': params}, inputs)['log_var']
  assert out['thm'].dtype == jnp.float32
  np.testing.assert_allclose(float(out['thm']), 3.0, rtol=1e-6)
  np.testing.assert_allclose(float(out['tof']), -3.0, rtol=1e-6)


def test_variance_head_start_and_bound():
  model = models.MaskedImputer(TARGETS, hidden_dim=16, num_heads=2, learn_log_var=True,
                               log_var_bound=3.0, variance_head=True)
  inputs = make_inputs(prior=False)
  params = init(model, inputs)
  params = dict(params, log_var_thm=jnp.float32(0.5))
  out = model.apply({'params': params}, inputs)['log_var']
  assert out['thm'].shape == (2, 8, 17)
  assert out['tof'].shape == (2, 8, 320)
  np.testing.assert_allclose(np.asarray(out['thm']), 3.0 * np.tanh(0.5 / 3.0), rtol=1e-6)
  head = params['log_var_head_thm']
  params['log_var_head_thm'] = {'kernel': jnp.full_like(head['kernel'], 40.0),
                                'bias': jnp.linspace(-200.0, 200.0, 17)}
  out = np.asarray(model.apply({'params': params}, inputs)['log_var']['thm'])
  assert np.abs(out).max() <= 3.0
  assert out.std() > 0.1


@pytest.mark.parametrize('kernel_size', [1, 4, 5])
def test_depthwise_conv_equals_grouped_conv(kernel_size):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 6))
  shifted = models.DepthwiseConv1D(kernel_size)
  grouped = nn.Conv(6, (kernel_size,), padding='SAME', feature_group_count=6)
  params = shifted.init(jax.random.PRNGKey(1), x)
  reference = grouped.init(jax.random.PRNGKey(1), x)
  # Same names, shapes and initial values, so either module loads the other's checkpoints.
  chex.assert_trees_all_equal(params, reference)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  np.testing.assert_allclose(shifted.apply(params, x), grouped.apply(params, x), atol=1e-5)
  # By hand at one position: y[t] = b + sum_k w[k] * x[t + k - left].
  w, b = np.asarray(params['params']['kernel'][:, 0]), np.asarray(params['params']['bias'])
  left, t = (kernel_size - 1) // 2, 4
  expected = b + sum(w[k] * np.asarray(x)[0, t + k - left] for k in range(kernel_size))
  np.testing.assert_allclose(shifted.apply(params, x)[0, t], expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_trunk_keeps_float32_parameters_and_outputs():
  inputs = make_inputs()
  full = models.MaskedImputer(TARGETS, hidden_dim=16, num_heads=2, learn_log_var=True,
                              sensors=(('input', 'imu', (0,)), ('target', 'thm', (0, 1))),
                              inputs=(('imu', 20),))
  half = full.clone(dtype=jnp.bfloat16)
  params = init(full, inputs)
  # The same parameter tree, all float32, whatever the compute dtype.
  chex.assert_trees_all_equal_shapes_and_dtypes(params, init(half, inputs))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  exact = full.apply({'params': params}, inputs)
  rounded = half.apply({'params': params}, inputs)
  for g in RAW:
    assert rounded['recon'][g].dtype == jnp.float32
    assert rounded['log_var'][g].dtype == jnp.float32
    # bfloat16 keeps 8 significant bits: relative rounding of about 0.4 % per operation.
    error = np.abs(np.asarray(rounded['recon'][g]) - np.asarray(exact['recon'][g]))
    scale = np.abs(np.asarray(exact['recon'][g])).mean()
    assert 0 < error.mean() < 0.05 * scale
  variables = half.init(jax.random.PRNGKey(0), inputs, output='projection')
  projection = half.apply(variables, inputs, output='projection')['projection']
  assert projection.dtype == jnp.float32
