"""Checkpoint restores: tree checks before loading, exact round trips and partial restores."""

import json
import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imputer import checkpointing
from imputer import cmi
from imputer import impute
from imputer import layout as layout_lib
from imputer import models
from imputer import training
from tests.helpers import tiny_config


@flax.struct.dataclass
class SmallState:
  """A train-state-like dataclass: Adam's namedtuples give paths such as opt_state/0/mu/..."""

  step: Any
  params: Any
  opt_state: Any
  extra: Any = None


def small_state(params, step=7, extra=None):
  return SmallState(step=jnp.asarray(step, jnp.int32), params=params,
                    opt_state=optax.adam(1e-3).init(params), extra=extra)


def saved_params():
  return {'dense': {'kernel': jnp.arange(12, dtype=jnp.float32).reshape(4, 3) - 5.5,
                    'bias': jnp.asarray([0.5, -1.0, 2.0], jnp.float32)},
          'old': jnp.asarray([3.0, 4.0], jnp.float32),
          'scale': jnp.asarray([1.5, -2.5], jnp.float32)}


def changed_params(fill=9.0):
  """Return saved_params' tree with 'old' gone, 'new' added, a reshaped kernel and a bfloat16
  bias; every value is `fill`, which no saved value equals."""
  return {'dense': {'kernel': jnp.full((5, 3), fill, jnp.float32),
                    'bias': jnp.full((3,), fill, jnp.bfloat16)},
          'new': jnp.full((4,), fill, jnp.float32),
          'scale': jnp.full((2,), fill, jnp.float32)}


def save(tmp_path, state, step=7, scalers=None, best_loss=None):
  checkpoints = checkpointing.Checkpoints(str(tmp_path), 2)
  if best_loss is None:
    checkpoints.save(step, state, scalers or {'thm': {'center': [1.0]}})
  else:
    checkpoints.save_best(step, state, scalers or {'thm': {'center': [1.0]}}, best_loss)
  checkpoints.wait()
  return checkpoints


def leaves(tree) -> dict:
  return checkpointing.leaves_by_path(checkpointing.state_tree(tree))


def assert_same_bits(got, expected, name):
  got, expected = np.asarray(got), np.asarray(expected)
  assert got.dtype == expected.dtype, name
  assert got.shape == expected.shape, name
  assert got.tobytes() == expected.tobytes(), name


def test_mismatch_error_lists_every_kind(tmp_path):
  checkpoints = save(tmp_path, small_state(saved_params()))
  target = checkpointing.abstract_like(small_state(changed_params(), step=0))
  with pytest.raises(checkpointing.CheckpointMismatchError) as caught:
    checkpoints.restore_latest(target)
  checkpoints.close()
  error = caught.value
  message = str(error)
  assert isinstance(error, ValueError)
  assert f'checkpoint {tmp_path}/checkpoints step 7 does not match' in message
  assert 'only in the checkpoint (3):' in message
  assert 'params/old: saved (2,) float32' in message
  assert 'opt_state/0/mu/old: saved (2,) float32' in message
  assert 'only in the model (3):' in message
  assert 'params/new: expected (4,) float32' in message
  assert 'opt_state/0/nu/new: expected (4,) float32' in message
  assert 'shape or dtype differs (6):' in message
  assert 'params/dense/kernel: saved (4, 3) float32, expected (5, 3) float32' in message
  assert 'params/dense/bias: saved (3,) float32, expected (3,) bfloat16' in message
  assert 'opt_state/0/mu/dense/bias: saved (3,) float32, expected (3,) bfloat16' in message
  assert '--config.restore_partial=True' in message
  assert 'params/scale' not in message
  assert 'step:' not in message

  mismatch = error.mismatch
  assert (error.directory, error.step) == (f'{tmp_path}/checkpoints', 7)
  assert mismatch.only_saved == {f'{p}old': ((2,), 'float32')
                                 for p in ('opt_state/0/mu/', 'opt_state/0/nu/', 'params/')}
  assert mismatch.only_expected == {f'{p}new': ((4,), 'float32')
                                    for p in ('opt_state/0/mu/', 'opt_state/0/nu/', 'params/')}
  expected_differing = {}
  for prefix in ('opt_state/0/mu/', 'opt_state/0/nu/', 'params/'):
    expected_differing[f'{prefix}dense/kernel'] = (((4, 3), 'float32'), ((5, 3), 'float32'))
    expected_differing[f'{prefix}dense/bias'] = (((3,), 'float32'), ((3,), 'bfloat16'))
  assert mismatch.differing == expected_differing


def test_matching_tree_restores_bit_for_bit(tmp_path):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 3)).astype(np.float32)
  kernel[0, :] = [np.nan, -0.0, np.inf]
  kernel[1, 0] = np.float32(1e-42)  # A subnormal number.
  params = {'dense': {'kernel': jnp.asarray(kernel),
                      'bias': jnp.asarray(rng.normal(size=3), jnp.bfloat16)},
            'rng': jnp.asarray(rng.integers(0, 2**32, size=2, dtype=np.uint32)),
            'count': jnp.asarray([-3, 2**31 - 1], jnp.int32)}
  state = small_state(params, step=11)
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32
                                               else x, state.opt_state))
  checkpoints = save(tmp_path, state, step=11, scalers={'acc': {'scale': [2.0, 3.0]}})
  zeros = jax.tree.map(jnp.zeros_like, state)
  restored, scalers = checkpoints.restore_latest(checkpointing.abstract_like(zeros))
  checkpoints.close()

  assert scalers == {'acc': {'scale': [2.0, 3.0]}}
  assert isinstance(restored, SmallState)
  assert restored.extra is None
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  expected = leaves(state)
  assert list(leaves(restored)) == list(expected)
  for name, value in leaves(restored).items():
    assert_same_bits(value, expected[name], name)


def test_partial_restore_keeps_fallback(tmp_path, caplog):
  saved = small_state(saved_params())
  checkpoints = save(tmp_path, saved)
  fallback = small_state(changed_params(), step=0)
  with caplog.at_level(logging.WARNING):
    restored, scalers = checkpoints.restore_latest(
        checkpointing.abstract_like(fallback), partial=True, fallback=fallback)
  checkpoints.close()

  assert scalers == {'thm': {'center': [1.0]}}
  assert isinstance(restored, SmallState)
  assert jax.tree.structure(restored) == jax.tree.structure(fallback)
  saved_leaves, fallback_leaves = leaves(saved), leaves(fallback)
  not_restored = {f'{p}{k}' for p in ('opt_state/0/mu/', 'opt_state/0/nu/', 'params/')
                  for k in ('dense/kernel', 'dense/bias', 'new')}
  restored_leaves = leaves(restored)
  assert set(restored_leaves) == set(fallback_leaves)
  for name, value in restored_leaves.items():
    source = fallback_leaves if name in not_restored else saved_leaves
    assert_same_bits(value, source[name], name)
  # The restored entries, spelled out: the step, the unchanged parameter and Adam's count.
  assert int(restored.step) == 7
  np.testing.assert_array_equal(np.asarray(restored.params['scale']), [1.5, -2.5])
  assert int(restored.opt_state[0].count) == 0
  np.testing.assert_array_equal(np.asarray(restored.params['dense']['kernel']),
                                np.full((5, 3), 9.0, np.float32))

  warnings = [r.getMessage() for r in caplog.records if 'Partial restore' in r.getMessage()]
  assert len(warnings) == 1
  assert f'{tmp_path}/checkpoints step 7: 9 entries' in warnings[0]
  for name in sorted(not_restored):
    assert name in warnings[0]
  assert 'params/dense/kernel: saved (4, 3) float32, expected (5, 3) float32' in warnings[0]


def test_partial_restore_of_matching_tree(tmp_path, caplog):
  state = small_state(saved_params())
  checkpoints = save(tmp_path, state)
  fallback = jax.tree.map(jnp.zeros_like, state)
  with caplog.at_level(logging.WARNING):
    restored, _ = checkpoints.restore_latest(checkpointing.abstract_like(fallback),
                                             partial=True, fallback=fallback)
  checkpoints.close()
  expected = leaves(state)
  for name, value in leaves(restored).items():
    assert_same_bits(value, expected[name], name)
  assert not [r for r in caplog.records if 'Partial restore' in r.getMessage()]


def test_partial_restore_needs_fallback(tmp_path):
  checkpoints = save(tmp_path, small_state(saved_params()))
  target = checkpointing.abstract_like(small_state(changed_params()))
  with pytest.raises(ValueError, match='a partial restore needs `fallback`'):
    checkpoints.restore_latest(target, partial=True)
  other = small_state({'scale': jnp.zeros(2)})
  with pytest.raises(ValueError, match='must have the tree of the restore target'):
    checkpoints.restore_latest(target, partial=True, fallback=other)
  checkpoints.close()


def test_none_fields_keep_old_layout(tmp_path):
  plain = small_state(saved_params())
  checkpoints = save(tmp_path / 'plain', plain)
  restored, _ = checkpoints.restore_latest(checkpointing.abstract_like(plain))
  assert restored.extra is None
  with_extra = plain.replace(extra=jnp.zeros((2, 2), jnp.float32))
  with pytest.raises(ValueError, match=r'only in the model \(1\):\n    extra: expected '
                                       r'\(2, 2\) float32'):
    checkpoints.restore_latest(checkpointing.abstract_like(with_extra))
  checkpoints.close()

  checkpoints = save(tmp_path / 'extra', with_extra)
  with pytest.raises(ValueError, match=r'only in the checkpoint \(1\):\n    extra: saved '
                                       r'\(2, 2\) float32'):
    checkpoints.restore_latest(checkpointing.abstract_like(plain))
  restored, _ = checkpoints.restore_latest(checkpointing.abstract_like(plain), partial=True,
                                           fallback=plain)
  checkpoints.close()
  assert restored.extra is None
  np.testing.assert_array_equal(np.asarray(restored.params['old']), [3.0, 4.0])


def test_restore_best_checks_tree(tmp_path):
  checkpoints = save(tmp_path, small_state(saved_params()), step=5, best_loss=0.5)
  target = checkpointing.abstract_like(small_state(changed_params()))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=f'checkpoint {tmp_path}/checkpoints_best step 5 does not match'):
    checkpoints.restore_best(target)
  assert checkpoints.restore_latest(target) is None
  checkpoints.close()


# The package's own TrainState, built as training and impute mode build it.


def cmi_layouts():
  input_groups, target_groups = cmi.cmi_groups()
  return layout_lib.build_layouts(input_groups), layout_lib.build_layouts(target_groups)


def build_train_state(config):
  input_layouts, target_layouts = cmi_layouts()
  model = models.build_model(config, input_layouts, target_layouts)
  tx = training.make_optimizer(config.optim, training.make_schedule(config.optim, 10))
  window = config.data.window
  batch = {'valid': np.ones((1, window), bool),
           'values': {l.name: np.zeros((1, window, l.num_features), np.float32)
                      for l in input_layouts + target_layouts},
           'observed': {l.name: np.ones((1, window, l.num_features), bool)
                        for l in input_layouts + target_layouts}}
  init = jax.jit(lambda key, example: training.create_train_state(
      key, example, model=model, tx=tx, input_layouts=input_layouts,
      target_layouts=target_layouts, prior=config.model.interpolation_prior))
  return init(jax.random.PRNGKey(config.seed), batch)


@pytest.fixture(scope='module')
def train_states():
  """Return step-0 TrainStates of tiny phase 1 with model.hidden_dim 16 and 8."""
  return {h: build_train_state(tiny_config(**{'model.hidden_dim': h})) for h in (16, 8)}


def test_train_state_hidden_dim_mismatch(train_states, tmp_path):
  saved = train_states[16].replace(step=jnp.asarray(40, jnp.int32))
  checkpoints = save(tmp_path, saved, step=40)
  smaller = train_states[8]
  with pytest.raises(checkpointing.CheckpointMismatchError) as caught:
    checkpoints.restore_latest(checkpointing.abstract_like(smaller))
  features = saved.params['input_projection']['kernel'].shape[0]
  message = str(caught.value)
  assert f'checkpoint {tmp_path}/checkpoints step 40 does not match' in message
  assert (f'params/input_projection/kernel: saved ({features}, 16) float32, expected '
          f'({features}, 8) float32') in message
  assert 'params/head_thm/kernel: saved (16, 17) float32, expected (8, 17) float32' in message
  assert (f'opt_state/1/0/mu/input_projection/kernel: saved ({features}, 16) float32, '
          f'expected ({features}, 8) float32') in message
  assert not caught.value.mismatch.only_saved
  assert not caught.value.mismatch.only_expected

  restored, _ = checkpoints.restore_latest(checkpointing.abstract_like(smaller), partial=True,
                                           fallback=smaller)
  checkpoints.close()
  assert int(restored.step) == 40
  not_restored = set(caught.value.mismatch.differing)
  saved_leaves, fallback_leaves = leaves(saved), leaves(smaller)
  restored_leaves = leaves(restored)
  assert set(restored_leaves) == set(fallback_leaves)
  assert 'params/head_thm/bias' in set(restored_leaves) - not_restored
  for name, value in restored_leaves.items():
    source = fallback_leaves if name in not_restored else saved_leaves
    assert_same_bits(value, source[name], name)


def write_workdir(root, state, config, step):
  """Write a workdir as training leaves it: config.json and a checkpoint with scalers."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))
  input_layouts, target_layouts = cmi_layouts()
  scalers = {l.name: {'center': [0.0] * l.num_features, 'scale': [1.0] * l.num_features,
                      'count': [1.0] * l.num_features} for l in input_layouts + target_layouts}
  save(root, state, step=step, scalers=scalers).close()


def test_load_imputer_names_mismatch(train_states, tmp_path):
  saved = train_states[16].replace(step=jnp.asarray(3, jnp.int32))
  workdir = tmp_path / 'run'
  write_workdir(workdir, saved, tiny_config(**{'model.hidden_dim': 8}), step=3)
  with pytest.raises(ValueError) as caught:
    impute.load_imputer(str(workdir))
  message = str(caught.value)
  assert f'checkpoint {workdir}/checkpoints step 3 does not match' in message
  assert 'params/head_thm/kernel: saved (16, 17) float32, expected (8, 17) float32' in message
  assert f'{workdir}/config.json describes another model' in message
  assert 'restore_partial' not in message

  with open(workdir / 'config.json', encoding='utf-8') as f:
    config = json.load(f)
  config['model']['hidden_dim'] = 16
  with open(workdir / 'config.json', 'w', encoding='utf-8') as f:
    json.dump(config, f)
  imputer = impute.load_imputer(str(workdir))
  assert imputer.checkpoint == {'step': 3, 'kind': 'latest'}
  expected = checkpointing.leaves_by_path(saved.params)
  for name, value in checkpointing.leaves_by_path(imputer.params).items():
    assert_same_bits(value, expected[name], name)
