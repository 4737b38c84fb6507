"""Masked reconstruction losses, plain and uncertainty-aware.

Each group's loss averages an elementwise error over the positions that the training mask
hid and the recording observed. Padding and values missing in the file never count. All
losses are computed in float32.

The uncertainty-aware forms learn one log-variance s per group:

* conf_mse, Gaussian negative log-likelihood up to a constant: 0.5 * exp(-s) * MSE + 0.5 * s
* conf_mae, Laplace negative log-likelihood up to a constant: exp(-s) * MAE + s
* conf_huber: exp(-s) * Huber + s. This is a heuristic that borrows the Laplace form; the
  Huber loss is not the negative log-likelihood of a standard distribution.

With a variance head the model gives s per value instead, and the same forms are averaged
value by value: mean(0.5 * exp(-s) * e² + 0.5 * s) and mean(exp(-s) * |e| + s).

In scaled units, s is log σ² for the Gaussian and log b, the Laplace scale, for the others. A
Laplace distribution with scale b has the standard deviation √2 · b.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

PLAIN_KINDS = ('mse', 'mae', 'huber')
CONF_KINDS = ('conf_mse', 'conf_mae', 'conf_huber')


def elementwise_error(kind: str, prediction, target, huber_delta: float = 1.0):
  """Return the per-element error for 'mse', 'mae' or 'huber' (and their conf_ forms)."""
  base = kind.removeprefix('conf_')
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  if base == 'mse':
    return diff * diff
  if base == 'mae':
    return jnp.abs(diff)
  if base == 'huber':
    abs_diff = jnp.abs(diff)
    quadratic = jnp.minimum(abs_diff, huber_delta)
    return 0.5 * quadratic * quadratic + huber_delta * (abs_diff - quadratic)
  raise ValueError(
      f'loss.kind={kind!r} is unknown; use one of {", ".join(PLAIN_KINDS + CONF_KINDS)}.')


def masked_mean(error, weight):
  """Return (mean of `error` over `weight` > 0, count); 0 with zero gradient when empty.

  The denominator is clamped to 1 before the division, so an empty group divides 0 by 1 in
  the forward pass and no NaN or infinity can reach a gradient.
  """
  weight = weight.astype(jnp.float32)
  count = weight.sum()
  return (error * weight).sum() / jnp.maximum(count, 1.0), count


def confidence_weighted(kind: str, loss, log_var, count):
  """Apply the Gaussian (conf_mse) or Laplace (conf_mae, conf_huber) form to a group loss.

  A group with nothing to score (count 0) returns exactly 0, including the +s term, so its
  log-variance gets a zero gradient instead of drifting.
  """
  s = log_var.astype(jnp.float32)
  if kind == 'conf_mse':
    value = 0.5 * jnp.exp(-s) * loss + 0.5 * s
  else:
    value = jnp.exp(-s) * loss + s
  return jnp.where(count > 0, value, 0.0)


def per_value_confidence(kind: str, error, log_var, weight):
  """Return the mean over `weight` > 0 of the per-value Gaussian or Laplace form.

  `error` and `log_var` have the same shape. A group with nothing to score gives exactly 0.
  """
  s = log_var.astype(jnp.float32)
  if kind == 'conf_mse':
    value = 0.5 * jnp.exp(-s) * error + 0.5 * s
  else:
    value = jnp.exp(-s) * error + s
  return masked_mean(value, weight)[0]


def predictive_std(kind: str, log_var):
  """Return the standard deviation (scaled units, float64 on the host) of log-variances.

  Gaussian (conf_mse): σ = exp(s / 2). Laplace (conf_mae, and conf_huber, which borrows its
  form): σ = √2 · exp(s).
  """
  log_var = np.asarray(log_var, np.float64)
  if kind == 'conf_mse':
    return np.exp(0.5 * log_var)
  return math.sqrt(2.0) * np.exp(log_var)


def reconstruction_loss(config_loss, outputs, targets, weights, group_weights,
                        huber_delta=None):
  """Return (total, terms) over target groups.

  `huber_delta` overrides `config_loss.huber_delta` (an array in a side-by-side study).
  `outputs` is the model output ({'recon': {g: (B, W, F)}, optionally 'log_var'}), `targets`
  and `weights` map each group to (B, W, F) values and 0/1 scoring masks. `terms` holds, per
  group, the plain masked loss, the count and, for conf_ kinds, the weighted loss and s.
  """
  kind = config_loss.kind
  total = jnp.zeros((), jnp.float32)
  terms = {}
  for name, target in targets.items():
    delta = config_loss.huber_delta if huber_delta is None else huber_delta
    error = elementwise_error(kind, outputs['recon'][name], target, delta)
    loss, count = masked_mean(error, weights[name])
    terms[f'loss_recon_{name}'] = loss
    terms[f'count_{name}'] = count
    if kind in CONF_KINDS:
      log_var = outputs['log_var'][name]
      if jnp.ndim(log_var) == 0:
        loss = confidence_weighted(kind, loss, log_var, count)
      else:
        loss = per_value_confidence(kind, error, log_var, weights[name])
        # The logged figure is the mean log-variance over the scored values.
        log_var = masked_mean(log_var, weights[name])[0]
      terms[f'loss_conf_{name}'] = loss
      terms[f'log_var_{name}'] = log_var
    total = total + group_weights.get(name, 1.0) * loss
  return total, terms


CONSISTENCY_POSITIONS = ('both_visible', 'both_hidden', 'all')


def consistency_positions(kind: str, observed, hidden_a, hidden_b):
  """Select the positions of the consistency loss; all three masks are (B, W, F) bool.

  'both_visible': observed and unmasked in both views' inputs; 'both_hidden': observed and
  hidden in both views; 'all': every observed position. `observed` must exclude padding.
  """
  if kind == 'both_visible':
    return observed & ~hidden_a & ~hidden_b
  if kind == 'both_hidden':
    return observed & hidden_a & hidden_b
  if kind == 'all':
    return observed
  raise ValueError(f'consistency.positions={kind!r} is unknown; use one of '
                   f'{", ".join(CONSISTENCY_POSITIONS)}.')


def consistency_loss(recon_a, recon_b, positions):
  """Return (MSE between two reconstructions over `positions`, summed over groups; count)."""
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for name, weight in positions.items():
    diff = recon_a[name].astype(jnp.float32) - recon_b[name].astype(jnp.float32)
    loss, group_count = masked_mean(diff * diff, weight)
    total = total + loss
    count = count + group_count
  return total, count


def parse_group_weights(text: str, target_names) -> dict[str, float]:
  """Parse 'thm=1,tof=0.5' into a dict of finite, non-negative weights, not all zero."""
  weights = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, sep, value = item.partition('=')
    name = name.strip()
    if not sep or name not in target_names:
      raise ValueError(
          f'loss.group_weights: {item!r} is not group=weight with a target group among '
          f'{", ".join(target_names)}; write for example "{target_names[0]}=1.0".')
    if name in weights:
      raise ValueError(f'loss.group_weights: group {name!r} is given twice; give it once.')
    try:
      weight = float(value)
    except ValueError as error:
      raise ValueError(f'loss.group_weights: weight {value!r} of group {name!r} is not a '
                       'number; write for example "thm=0.5".') from error
    if not math.isfinite(weight) or weight < 0:
      raise ValueError(f'loss.group_weights: weight {value!r} of group {name!r} is invalid; '
                       'use a finite number of 0 or more.')
    weights[name] = weight
  if weights and all(weights.get(n, 1.0) == 0 for n in target_names):
    raise ValueError('loss.group_weights: every target group has weight 0, so nothing would '
                     'be trained; give at least one group a positive weight.')
  return weights
