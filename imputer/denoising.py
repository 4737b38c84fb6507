"""Auxiliary denoising: corrupt part of the IMU input and score a head that restores it.

Each observed, valid input value is corrupted independently with probability `ratio` by
adding sigma * N(0, 1), in scaled units, on device from the step's key. Engineered channels
are corrupted on their own, not recomputed from corrupted raw channels, so the corruption is
exactly the requested fraction of the values the model reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POSITIONS = ('corrupted', 'all')


def corrupt(key, values: dict, observed: dict, valid, ratio: float, sigma: float):
  """Return (corrupted values, corrupted masks) for every group in `values`.

  values[g]: (B, W, F) scaled inputs; observed[g]: (B, W, F) bool; valid: (B, W) bool. Only
  observed values of valid timesteps are ever corrupted.
  """
  corrupted, masks = {}, {}
  for name, group_key in zip(sorted(values), jax.random.split(key, len(values))):
    pick_key, noise_key = jax.random.split(group_key)
    eligible = observed[name] & valid[..., None]
    mask = eligible & jax.random.bernoulli(pick_key, ratio, eligible.shape)
    noise = sigma * jax.random.normal(noise_key, values[name].shape, jnp.float32)
    corrupted[name] = values[name] + jnp.where(mask, noise, 0.0).astype(values[name].dtype)
    masks[name] = mask
  return corrupted, masks


def denoise_loss(denoised: dict, clean: dict, weights: dict):
  """Return (MSE of `denoised` against `clean` over every weighted value, count).

  All groups are pooled into one mean. With nothing weighted the loss is exactly 0.
  """
  total, count = 0.0, 0.0
  for name in sorted(denoised):
    weight = weights[name].astype(jnp.float32)
    diff = denoised[name].astype(jnp.float32) - clean[name].astype(jnp.float32)
    total = total + jnp.sum(diff * diff * weight)
    count = count + jnp.sum(weight)
  return total / jnp.maximum(count, 1.0), count
