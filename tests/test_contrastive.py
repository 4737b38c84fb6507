"""Momentum encoder, key queue and InfoNCE, checked against numpy and by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imputer import contrastive


def test_ema_zero_momentum_copies_online():
  old = {'a': jnp.array([1.0, 2.0]), 'b': {'c': jnp.array(3.0)}}
  online = {'a': jnp.array([5.0, -1.0]), 'b': {'c': jnp.array(0.25)}}
  out = contrastive.ema_update(old, online, 0.0)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(online)):
    np.testing.assert_array_equal(got, want)


def test_ema_unit_momentum_keeps_old():
  old = {'a': jnp.array([1.0, 2.0]), 'b': {'c': jnp.array(3.0)}}
  online = {'a': jnp.array([5.0, -1.0]), 'b': {'c': jnp.array(0.25)}}
  out = contrastive.ema_update(old, online, 1.0)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(old)):
    np.testing.assert_array_equal(got, want)


def test_ema_interpolates():
  out = contrastive.ema_update({'a': jnp.array(10.0)}, {'a': jnp.array(0.0)}, 0.9)
  np.testing.assert_allclose(out['a'], 9.0, rtol=1e-6)


def test_momentum_schedules():
  assert float(contrastive.momentum_at(5, 0.99, 'constant', 100)) == pytest.approx(0.99)
  cosine = [float(contrastive.momentum_at(s, 0.9, 'cosine', 100)) for s in (0, 50, 100, 200)]
  np.testing.assert_allclose(cosine, [0.9, 0.95, 1.0, 1.0], atol=1e-6)
  with pytest.raises(ValueError, match='momentum_schedule'):
    contrastive.momentum_at(0, 0.9, 'linear', 10)


def test_queue_fifo_wrap():
  queue = jnp.zeros((5, 2))
  first = jnp.arange(6, dtype=jnp.float32).reshape(3, 2)  # rows 0, 1, 2
  queue, pointer, filled = contrastive.enqueue(queue, jnp.int32(0), jnp.int32(0), first,
                                               jnp.array([True, True, True]))
  assert (int(pointer), int(filled)) == (3, 3)
  np.testing.assert_array_equal(queue[:3], first)
  np.testing.assert_array_equal(queue[3:], 0.0)
  # Four keys of which the second is padding: three writes go to slots 3, 4 and 0.
  second = 10.0 + jnp.arange(8, dtype=jnp.float32).reshape(4, 2)
  queue, pointer, filled = contrastive.enqueue(queue, pointer, filled, second,
                                               jnp.array([True, False, True, True]))
  assert (int(pointer), int(filled)) == (1, 5)
  expected = np.array([[16, 17], [2, 3], [4, 5], [10, 11], [14, 15]], np.float32)
  np.testing.assert_array_equal(queue, expected)


def test_queue_nothing_kept():
  queue = jnp.ones((4, 3))
  out, pointer, filled = contrastive.enqueue(queue, jnp.int32(2), jnp.int32(2),
                                             jnp.zeros((2, 3)), jnp.array([False, False]))
  np.testing.assert_array_equal(out, queue)
  assert (int(pointer), int(filled)) == (2, 2)


def numpy_info_nce(q, k, queue, filled, temperature, weights):
  losses = []
  for i in range(len(q)):
    logits = np.concatenate([[q[i] @ k[i]], queue[:filled] @ q[i]]) / temperature
    losses.append(np.log(np.exp(logits).sum()) - logits[0])
  losses = np.asarray(losses)
  return (losses * weights).sum() / weights.sum()


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  q, k = unit(rng.normal(size=(6, 4))), unit(rng.normal(size=(6, 4)))
  queue = unit(rng.normal(size=(10, 4)))
  weights = np.array([1, 1, 0, 1, 1, 1], np.float32)
  loss, metrics = contrastive.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue),
                                       jnp.int32(7), 0.2, jnp.asarray(weights))
  np.testing.assert_allclose(float(loss), numpy_info_nce(q, k, queue, 7, 0.2, weights),
                             rtol=1e-5)
  kept = weights > 0
  np.testing.assert_allclose(float(metrics['contrastive_positive_cosine']),
                             np.sum(q * k, axis=1)[kept].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['contrastive_negative_cosine']),
                             (q[kept] @ queue[:7].T).mean(), rtol=1e-5)


def test_info_nce_empty_queue():
  rng = np.random.default_rng(1)
  q, k = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(3, 4)))

  def loss_fn(queries):
    return contrastive.info_nce(queries, jnp.asarray(k), jnp.zeros((5, 4)), jnp.int32(0), 0.1,
                                jnp.ones(3))[0]

  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(q))
  assert float(loss) == 0.0
  assert np.isfinite(np.asarray(grad)).all()


def test_info_nce_orthogonal_pairs():
  # Query orthogonal to its key and to every negative: all logits equal, loss = log(1 + K).
  q = np.eye(4, dtype=np.float32)[:1]
  k = np.eye(4, dtype=np.float32)[1:2]
  queue = np.eye(4, dtype=np.float32)[2:]
  loss, _ = contrastive.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue),
                                 jnp.int32(2), 0.5, jnp.ones(1))
  np.testing.assert_allclose(float(loss), math.log(3.0), rtol=1e-6)
