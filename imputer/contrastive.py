"""Contrastive alignment with a momentum encoder and a queue of keys, in the manner of MoCo.

Two augmented views of every training window are encoded. The online model turns view A
into a query q, and the momentum model, an exponential moving average of the online
encoder and projection head, turns view B into a key k. InfoNCE pulls each query towards its
own key and away from the keys of earlier batches held in a first-in, first-out queue.

Order within one train step, which `training.Steps.train_step` follows:

1. The keys are computed with the momentum parameters as they were before the step.
2. The loss, with the queue as it was before the step, gives gradients for the online
   parameters, and the optimizer updates them.
3. The momentum parameters move towards the updated online parameters:
   theta_k <- m * theta_k + (1 - m) * theta_q.
4. The step's keys are written into the queue, so they serve as negatives from the next step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MOMENTUM_SCHEDULES = ('constant', 'cosine')


def ema_update(ema_params, online_params, m):
  """Return m * momentum + (1 - m) * online, leaf by leaf (m = 0 copies the online values)."""
  return jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, ema_params, online_params)


def momentum_at(step, base: float, schedule: str, total_steps: int):
  """Return the EMA momentum of `step`.

  'constant' keeps `base`. 'cosine' rises from `base` at step 0 to 1 at `total_steps`:
  m = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2.
  """
  if schedule == 'constant':
    return jnp.asarray(base, jnp.float32)
  if schedule == 'cosine':
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0
  raise ValueError(f'contrastive.momentum_schedule={schedule!r} is unknown; use '
                   f'{" or ".join(repr(s) for s in MOMENTUM_SCHEDULES)}.')


def enqueue(queue, pointer, filled, keys, keep):
  """Write the `keep` rows of `keys` into the (K, D) ring buffer, in row order.

  Row i that is kept goes to slot (pointer + number of kept rows before i) mod K, so a
  batch that passes the end wraps to the start. Rows that are not kept (padding, empty
  windows) write nothing and do not move the pointer. Returns (queue, pointer, filled),
  where `filled` counts the slots holding a key, at most K. The number of kept rows must not
  exceed K, which the config check guarantees (queue size at least the batch size).
  """
  size = queue.shape[0]
  keep = keep.astype(jnp.int32)
  slots = (pointer + jnp.cumsum(keep) - 1) % size
  slots = jnp.where(keep > 0, slots, size)  # Out of range: dropped by the scatter.
  queue = queue.at[slots].set(keys.astype(queue.dtype), mode='drop')
  count = keep.sum()
  return queue, (pointer + count) % size, jnp.minimum(filled + count, size)


def info_nce(queries, keys, queue, filled, temperature: float, weights):
  """InfoNCE of each query against its key, with the filled queue slots as negatives.

  queries and keys are (B, D) unit vectors, and weights (B,) is 1 for rows that count. The
  queue is (K, D) unit vectors, of which the first `filled` slots contain keys (the queue
  fills from slot 0 and never empties, so filled slots are always a prefix).

  loss_i = -log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) ), averaged
  over weighted rows. With an empty queue the loss is 0. Returns (loss, metrics) with the
  mean cosine similarity of positives and of negatives.
  """
  queries, keys = queries.astype(jnp.float32), keys.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  positive = jnp.sum(queries * keys, axis=-1)  # (B,)
  negative = queries @ queue.astype(jnp.float32).T  # (B, K)
  in_queue = jnp.arange(queue.shape[0]) < filled
  logits = jnp.concatenate(
      [positive[:, None], jnp.where(in_queue[None, :], negative, -jnp.inf)], axis=1)
  logits = logits / temperature
  per_row = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  count = jnp.maximum(weights.sum(), 1.0)
  loss = jnp.sum(per_row * weights) / count
  negative_pairs = weights.sum() * filled.astype(jnp.float32)
  negative_mean = jnp.sum(jnp.where(in_queue[None, :], negative, 0.0) * weights[:, None])
  metrics = {
      'contrastive_positive_cosine': jnp.sum(positive * weights) / count,
      'contrastive_negative_cosine': negative_mean / jnp.maximum(negative_pairs, 1.0),
  }
  return loss, metrics
