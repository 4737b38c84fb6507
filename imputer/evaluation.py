"""Evaluation on held-out subjects in original units, next to simple baselines.

Two scenarios are scored on the raw columns of every target group:

* `random_mask`: (timestep, sensor) units are hidden with `mask.eval_ratio` from a fixed key;
  the model and both baselines are scored on the same hidden, observed values.
* `imu_only`: every target value is hidden, as for a recording that carries only the IMU.

Baselines: `median` predicts the training median of each channel (the scaler's centre), and
`interpolation` interpolates each channel linearly in time over the values of the same
sequence that the mask left visible, holding the nearest value past either end. It applies
to `random_mask` only. A channel with no visible value in a sequence falls back to the
median, and the report counts those values.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from imputer import losses
from imputer import masking
from imputer import sharding

SCENARIOS = ('random_mask', 'imu_only')


def make_predict_fns(steps, config):
  """Return the two scenario functions (params, batch, key) -> (metrics, recon, hidden, log_var).

  `log_var` is {} without a conf_ loss (see `training.Steps.evaluate`). Each function also
  takes the `hyper` dict of a side-by-side variant (see `training.Steps`).
  """
  layouts = steps.target_layouts

  def random_mask(params, batch, key, hyper=None):
    batch_size, window = batch['valid'].shape
    hidden = masking.sample_hidden(key, layouts, batch_size, window, config.mask.eval_ratio, 0.0)
    metrics, recon, log_var = steps.evaluate(params, batch, hidden, hyper)
    return metrics, recon, hidden, log_var

  def imu_only(params, batch, key, hyper=None):
    # Every unit is hidden (probability 1). Drawing the all-true mask from the key keeps it a
    # run-time value: as a constant, XLA would spend tens of seconds folding the
    # interpolation prior of the ToF group at compile time.
    hidden = masking.sample_hidden(key, layouts, *batch['valid'].shape, 1.0, 0.0)
    metrics, recon, log_var = steps.evaluate(params, batch, hidden, hyper)
    return metrics, recon, hidden, log_var

  return {'random_mask': random_mask, 'imu_only': imu_only}


def _padded_rows(start: int, batch_size: int, total: int) -> tuple[np.ndarray, int]:
  rows = np.arange(start, min(start + batch_size, total))
  return np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])]), len(rows)


def global_batches(windows, batch_size: int, mesh):
  """Yield (batch index, global batch, real rows) over all windows in order.

  The last batch is filled up by repeating its last window with `valid` set to False, so the
  compiled shape never changes and the repeats are never scored.
  """
  for batch_index, start in enumerate(range(0, len(windows), batch_size)):
    rows, real = _padded_rows(start, batch_size, len(windows))
    local = windows.take(sharding.process_rows(rows))
    local['valid'] = local['valid'] & (sharding.process_rows(np.arange(batch_size)) < real)[:, None]
    yield batch_index, sharding.to_global(local, mesh), real


def predict_windows(predict_fn, params, windows, batch_size: int, mesh, key):
  """Run `predict_fn` over all windows and return host arrays.

  Returns (mean loss terms, recon, hidden, log_var), the last three keyed by group; log_var
  is {} for a model without learned variances. Loss terms are averaged over batches,
  weighted by their real windows.
  """
  parts = {'recon': {}, 'hidden': {}, 'log_var': {}}
  totals, seen = {}, 0
  for batch_index, batch, real in global_batches(windows, batch_size, mesh):
    metrics, *arrays = predict_fn(params, batch, jax.random.fold_in(key, batch_index))
    metrics, *arrays = multihost_utils.process_allgather((metrics, *arrays), tiled=True)
    for kind, out in zip(parts, arrays):
      for name, value in out.items():
        parts[kind].setdefault(name, []).append(np.asarray(value)[:real])
    for name, value in metrics.items():
      totals[name] = totals.get(name, 0.0) + float(value) * real
    seen += real
  mean = {name: value / max(seen, 1) for name, value in totals.items()}
  return (mean,) + tuple({n: np.concatenate(v) for n, v in parts[kind].items()}
                         for kind in parts)


def represent_windows(represent_fn, params, windows, batch_size: int, mesh) -> np.ndarray:
  """Return the (N, H) pooled representations of all windows, in window order."""
  parts = []
  for _, batch, real in global_batches(windows, batch_size, mesh):
    pooled = multihost_utils.process_allgather(represent_fn(params, batch), tiled=True)
    parts.append(np.asarray(pooled)[:real])
  return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def represent_local_windows(represent_fn, params, windows, batch_size: int) -> np.ndarray:
  """Return the (N, H) pooled representations of this process's own windows, in order.

  Runs on this process's first device alone, without collectives, so that processes with
  different windows (their shares of the training windows) need not take the same number
  of steps. `params` is the replicated global state, and its local copy is used.
  `represent_fn` must be jitted without shardings.
  """
  local_params = jax.tree.map(lambda x: x.addressable_data(0), params)
  parts = []
  for start in range(0, len(windows), batch_size):
    rows, real = _padded_rows(start, batch_size, len(windows))
    parts.append(np.asarray(represent_fn(local_params, windows.take(rows)))[:real])
  return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def stitch(index: np.ndarray, arrays: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
  """Put (N, W, C) window arrays back into per-sequence (T, C) arrays."""
  out = [np.zeros((length, arrays.shape[-1]), arrays.dtype) for length in lengths]
  for row, (i, start, size) in enumerate(index):
    out[i][start:start + size] = arrays[row, :size]
  return out


class ErrorSums:
  """Running per-channel sums for MAE, RMSE and R² over scored values.

  R² is variance-weighted: 1 - SSE / SST, where SST sums each channel's squared deviations
  from that channel's own mean. Pooling channels around one grand mean instead would count
  the offsets between channels as explained variance and flatter every method.
  """

  def __init__(self, num_channels: int):
    self.abs_error = 0.0
    self.sq_error = 0.0
    self.count = np.zeros(num_channels)
    self.truth_sum = np.zeros(num_channels)
    self.truth_sq_sum = np.zeros(num_channels)

  def add(self, truth: np.ndarray, prediction: np.ndarray, scored: np.ndarray) -> None:
    """Add the `scored` entries of (T, C) `truth` and `prediction`."""
    error = np.where(scored, prediction - truth, 0.0)
    kept = np.where(scored, truth, 0.0)
    self.abs_error += float(np.abs(error).sum())
    self.sq_error += float((error * error).sum())
    self.count += scored.sum(axis=0)
    self.truth_sum += kept.sum(axis=0)
    self.truth_sq_sum += (kept * kept).sum(axis=0)

  def result(self) -> dict:
    """Return mae, rmse, r2 and count; r2 is None when the scored truth has no variance."""
    count = int(self.count.sum())
    if count == 0:
      return {'mae': None, 'rmse': None, 'r2': None, 'count': 0}
    seen = self.count > 0
    total = float((self.truth_sq_sum[seen]
                   - self.truth_sum[seen] ** 2 / self.count[seen]).sum())
    r2 = 1.0 - self.sq_error / total if total > 1e-12 * max(count, 1) else None
    return {'mae': self.abs_error / count, 'rmse': float(np.sqrt(self.sq_error / count)),
            'r2': r2, 'count': count}


def expected_coverage(kind: str, k: float) -> float:
  """Return the probability that a value lies within k standard deviations of the mean.

  Gaussian (conf_mse): erf(k / √2). Laplace (the other conf_ kinds): 1 - exp(-k √2).
  """
  if kind == 'conf_mse':
    return math.erf(k / math.sqrt(2.0))
  return 1.0 - math.exp(-k * math.sqrt(2.0))


def negative_log_likelihood(kind: str, error: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Return the per-value NLL of `error` under a zero-mean Gaussian or Laplace with `std`."""
  if kind == 'conf_mse':
    return 0.5 * np.log(2.0 * np.pi * std * std) + 0.5 * (error / std) ** 2
  scale = std / math.sqrt(2.0)
  return np.log(2.0 * scale) + np.abs(error) / scale


class CalibrationSums:
  """Running sums of interval coverage and negative log-likelihood over scored values."""

  def __init__(self, kind: str):
    self.kind = kind
    self.count = 0
    self.within = {1: 0, 2: 0}
    self.nll = 0.0
    self.std = 0.0

  def add(self, truth, prediction, std, scored) -> None:
    """Add the `scored` entries of (T, C) truth, prediction and predicted std."""
    error = (prediction - truth)[scored]
    std = std[scored]
    self.count += int(error.size)
    for k in self.within:
      self.within[k] += int((np.abs(error) <= k * std).sum())
    self.nll += float(negative_log_likelihood(self.kind, error, std).sum())
    self.std += float(std.sum())

  def result(self) -> dict:
    if self.count == 0:
      return {'count': 0}
    out = {f'coverage_{k}sigma': self.within[k] / self.count for k in self.within}
    out.update({f'expected_{k}sigma': expected_coverage(self.kind, k) for k in self.within})
    out.update(nll=self.nll / self.count, mean_std=self.std / self.count, count=self.count)
    return out


def calibration(loss_kind, sequences, predictions, log_vars, hidden, layouts, scalers) -> dict:
  """Score the model's predicted spread on the hidden, observed values, in original units.

  For each group: the observed fraction of values within ±1σ and ±2σ of the prediction,
  next to what the model's distribution expects, the mean negative log-likelihood per value
  and the mean predicted σ. Inputs are per-sequence lists as in `score_scenario`.
  """
  out = {'distribution': 'gaussian' if loss_kind == 'conf_mse' else 'laplace'}
  for layout in layouts:
    name, raw = layout.name, layout.num_raw
    scaler = scalers[name]
    sums = CalibrationSums(loss_kind)
    for i, seq in enumerate(sequences):
      truth = np.nan_to_num(seq.raw[name])
      prediction = scaler.inverse(predictions[name][i][:, :raw], slice(0, raw))
      std = losses.predictive_std(loss_kind, log_vars[name][i][:, :raw]) * scaler.scale[:raw]
      sums.add(truth, prediction, std, hidden[name][i] & seq.observed[name])
    out[name] = sums.result()
  return out


def interpolate_sequence(values: np.ndarray, visible: np.ndarray, fallback: np.ndarray):
  """Interpolate each column of (T, C) `values` linearly over its `visible` rows.

  Returns (filled values, per-column bool that is True where the fallback was used because
  the column had no visible value).
  """
  time = np.arange(values.shape[0])
  out = np.empty_like(values, dtype=np.float64)
  used_fallback = np.zeros(values.shape[1], bool)
  for c in range(values.shape[1]):
    known = visible[:, c]
    if known.any():
      out[:, c] = np.interp(time, time[known], values[known, c])
    else:
      out[:, c] = fallback[c]
      used_fallback[c] = True
  return out, used_fallback


def _sensor_names(layout):
  return layout.spec.sensors if layout.num_sensors > 1 else ()


def score_scenario(scenario, sequences, predictions, hidden, layouts, scalers) -> dict:
  """Score the model and the baselines of one scenario; inputs are per-sequence lists.

  `predictions[g][i]` is the scaled (T, F) model output for sequence i and `hidden[g][i]` the
  (T, C_raw) hidden mask. Truth and every figure are in the channels' original units.
  """
  methods = ('model', 'median') + (('interpolation',) if scenario == 'random_mask' else ())
  sums = {m: {} for m in methods}
  fallback_values = {}
  for layout in layouts:
    name, raw = layout.name, layout.num_raw
    center = scalers[name].center[:raw]
    sensor = layout.sensor_of_raw
    keys = [name] + [f'{name}/{s}' for s in _sensor_names(layout)]
    for m in methods:
      for key in keys:
        sums[m][key] = ErrorSums(raw)
    fallback_values[name] = 0
    for i, seq in enumerate(sequences):
      truth = np.nan_to_num(seq.raw[name])
      scored = hidden[name][i] & seq.observed[name]
      candidates = {
          'model': scalers[name].inverse(predictions[name][i][:, :raw], slice(0, raw)),
          'median': np.broadcast_to(center, truth.shape),
      }
      if 'interpolation' in methods:
        visible = seq.observed[name] & ~hidden[name][i]
        filled, used = interpolate_sequence(truth, visible, center)
        candidates['interpolation'] = filled
        fallback_values[name] += int(scored[:, used].sum())
      for m, prediction in candidates.items():
        sums[m][name].add(truth, prediction, scored)
        for s, sensor_name in enumerate(_sensor_names(layout)):
          sums[m][f'{name}/{sensor_name}'].add(truth, prediction, scored & (sensor == s))
  result = {'model': _group_results(sums['model'], layouts),
            'baselines': {m: _group_results(sums[m], layouts) for m in methods[1:]}}
  if 'interpolation' in methods:
    result['interpolation_fallback_values'] = fallback_values
  return result


def _group_results(sums, layouts) -> dict:
  out = {}
  for layout in layouts:
    entry = sums[layout.name].result()
    sensors = _sensor_names(layout)
    if sensors:
      entry['per_sensor'] = {s: sums[f'{layout.name}/{s}'].result() for s in sensors}
    out[layout.name] = entry
  return out


def tof_comparison_image(target: np.ndarray, recon: np.ndarray, sensors: int = 5) -> np.ndarray:
  """Lay 5 ToF 8x8 frames side by side: targets on the top row, reconstructions below.

  Both rows share one grey scale (the targets' range), so brightness is comparable.
  """
  def frames(x):
    return np.concatenate(list(np.asarray(x).reshape(sensors, 8, 8)), axis=1)
  top, bottom = frames(target), frames(recon)
  low, high = float(top.min()), float(top.max())
  image = np.concatenate([top, bottom], axis=0)
  return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
