"""Scalar-first (w, x, y, z) quaternion arithmetic in numpy, broadcasting over leading axes.

A quaternion q rotates sensor-frame vectors into the world frame: v_world = q * v * conj(q).
"""

from __future__ import annotations

import numpy as np


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Return the Hamilton product a * b."""
  aw, ax, ay, az = np.moveaxis(np.asarray(a), -1, 0)
  bw, bx, by, bz = np.moveaxis(np.asarray(b), -1, 0)
  return np.stack([
      aw * bw - ax * bx - ay * by - az * bz,
      aw * bx + ax * bw + ay * bz - az * by,
      aw * by - ax * bz + ay * bw + az * bx,
      aw * bz + ax * by - ay * bx + az * bw,
  ], axis=-1)


def conjugate(q: np.ndarray) -> np.ndarray:
  return q * np.array([1.0, -1.0, -1.0, -1.0])


def normalize(q: np.ndarray) -> np.ndarray:
  """Scale to unit norm; a zero quaternion becomes NaN instead of dividing by zero."""
  norm = np.linalg.norm(q, axis=-1, keepdims=True)
  return q / np.where(norm > 0, norm, np.nan)


def from_axis_angle(axis, angle) -> np.ndarray:
  """Return unit quaternions for rotations by `angle` (radians, any shape) about `axis`."""
  axis = np.asarray(axis, dtype=np.float64)
  axis = axis / np.linalg.norm(axis)
  half = np.asarray(angle, dtype=np.float64)[..., None] / 2
  return np.concatenate([np.cos(half), np.sin(half) * axis], axis=-1)


def rotate(q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
  """Rotate (..., 3) vectors by unit quaternions: the vector part of q * v * conj(q)."""
  pure = np.concatenate([np.zeros(vectors.shape[:-1] + (1,)), vectors], axis=-1)
  return multiply(multiply(q, pure), conjugate(q))[..., 1:]


def world_z_in_sensor_frame(q: np.ndarray) -> np.ndarray:
  """Return the world z axis expressed in the sensor frame: the third row of R(q)."""
  w, x, y, z = np.moveaxis(q, -1, 0)
  return np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1)
