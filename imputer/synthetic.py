"""Synthetic recordings in the exact column layout of the CMI train.csv.

Each sequence simulates a hand that starts at a rest pose, moves towards a target location and
performs a gesture there. A smooth latent proximity in [0, 1] (0 at rest, 1 touching the face)
drives every sensor:

* the wrist pitches up as the hand rises, so the quaternion follows the proximity, and the
  accelerometer reads gravity rotated into the sensor frame plus the hand's linear acceleration;
* the thermopiles warm from the subject's ambient temperature towards skin temperature, with
  per-sensor gains and a first-order thermal lag;
* the time-of-flight distances shrink from a far rest scene to a near face pattern that differs
  per sensor. Pixels beyond the range limit read -1 (no return).

Thermopiles and ToF are therefore predictable from the IMU, which is what an imputer must learn.
Subjects differ in rest pose, lift angle, reach speed, ambient and skin temperature and face
distance. Missing data follows the real table: IMU-only sequences with every THM and ToF cell
empty, short THM dropouts, ToF sensors missing for spans of rows, random no-return pixels and a
few rows without a quaternion.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl

from imputer import cmi, features, quaternions
from imputer.recordings import RecordingSet

SAMPLE_RATE_HZ = 10.0  # Rows per second. It only scales the acceleration derived from positions.
TOF_RANGE_LIMIT = 249.0  # Distances beyond this read -1 (no return), so readings stay in 0..249.
MIN_SEQUENCE_LENGTH = 10  # Room for rest, reach, hold and gesture rows.

# name, sequence_type, peak proximity, gesture frequency (cycles per row),
# wrist roll amplitude (rad).
GESTURES = (
    ('Above ear - pull hair', 'Target', 0.85, 0.12, 0.10),
    ('Forehead - scratch', 'Target', 1.00, 0.25, 0.08),
    ('Eyebrow - pull hair', 'Target', 0.95, 0.10, 0.06),
    ('Cheek - pinch skin', 'Target', 0.95, 0.08, 0.05),
    ('Neck - scratch', 'Target', 0.70, 0.25, 0.08),
    ('Drink from bottle/cup', 'Non-Target', 0.80, 0.03, 0.04),
    ('Text on phone', 'Non-Target', 0.25, 0.30, 0.03),
    ('Scratch knee/leg skin', 'Non-Target', 0.05, 0.25, 0.08),
    ('Wave hello', 'Non-Target', 0.40, 0.15, 0.35),
)

# name, body rotation axis, body rotation angle (rad).
ORIENTATIONS = (
    ('Seated Straight', (1.0, 0.0, 0.0), 0.0),
    ('Seated Lean Non Dom - FACE DOWN', (1.0, 0.0, 0.0), 0.5),
    ('Lie on Back', (0.0, 1.0, 0.0), -1.3),
    ('Lie on Side - Non Dominant', (1.0, 0.0, 0.0), 1.3),
)

# Row segments of a sequence as (behavior, phase), in time order.
SEGMENTS = (
    ('Relaxes and moves hand to target location', 'Transition'),
    ('Hand at target location', 'Transition'),
    ('Performs gesture', 'Gesture'),
)

_THM_COUNT = len(features.CMI_THM_COLUMNS)
_TOF_COUNT = len(cmi.CMI_TOF_SENSORS)
_GRID = 8  # Each ToF sensor is an 8x8 grid.


@dataclasses.dataclass(frozen=True)
class _Device:
  """Per-sensor constants of the simulated wristband, shared by all subjects."""

  thm_offset: np.ndarray   # (5,) °C added to each thermopile.
  thm_gain: np.ndarray     # (5,) share of the skin-ambient difference that each thermopile reads.
  tof_rest: np.ndarray     # (5, 64) distances with the hand at rest, mostly beyond the range.
  tof_near: np.ndarray     # (5, 64) distances with the hand at the face.


@dataclasses.dataclass(frozen=True)
class _Subject:
  """Traits of one simulated subject."""

  name: str
  rest_pitch: float        # rad, wrist pitch at rest.
  lift_angle: float        # rad, extra pitch at proximity 1.
  reach_speed: float       # > 1 reaches the target in fewer rows.
  reach_length: float      # m, hand travel from rest to face.
  ambient: float           # °C
  skin: float              # °C
  thm_scale: float         # multiplies the device thermopile gains.
  face_distance: float     # multiplies the device near ToF distances.


def generate_cmi_frame(
    num_subjects: int = 8, sequences_per_subject: int = 24, min_length: int = 40,
    max_length: int = 120, imu_only_fraction: float = 0.4, seed: int = 0) -> pl.DataFrame:
  """Simulate a table with exactly the columns of the CMI train.csv, in its order.

  round(imu_only_fraction * number of sequences) sequences, chosen at random, have every THM
  and ToF cell empty. The result depends only on the arguments.
  """
  _check_arguments(num_subjects, sequences_per_subject, min_length, max_length, imu_only_fraction)
  rng = np.random.default_rng(seed)
  device = _draw_device(rng)
  subjects = [_draw_subject(rng, index) for index in range(1, num_subjects + 1)]
  total = num_subjects * sequences_per_subject
  imu_only = np.zeros(total, dtype=bool)
  imu_only[rng.permutation(total)[:round(imu_only_fraction * total)]] = True

  parts = []
  for index in range(total):
    subject = subjects[index // sequences_per_subject]
    length = int(rng.integers(min_length, max_length + 1))
    parts.append(_simulate_sequence(
        rng, device, subject, f'SEQ_{index + 1:06d}', length, bool(imu_only[index])))
  return _assemble_frame(parts)


def load_synthetic(
    num_subjects: int = 8, sequences_per_subject: int = 24, min_length: int = 40,
    max_length: int = 120, imu_only_fraction: float = 0.4, seed: int = 0,
    tof_no_return: str = 'missing', tof_far_value: float = 255.0) -> RecordingSet:
  """Generate a synthetic CMI-schema table and load it like a real CMI file."""
  frame = generate_cmi_frame(
      num_subjects, sequences_per_subject, min_length, max_length, imu_only_fraction, seed)
  source = f'synthetic CMI-schema data ({num_subjects} subjects, seed {seed})'
  return cmi.from_cmi_frame(frame, source, tof_no_return, tof_far_value)


def _check_arguments(
    num_subjects, sequences_per_subject, min_length, max_length, imu_only_fraction):
  if num_subjects < 1:
    raise ValueError(f'num_subjects must be at least 1, got {num_subjects}.')
  if sequences_per_subject < 1:
    raise ValueError(f'sequences_per_subject must be at least 1, got {sequences_per_subject}.')
  if min_length < MIN_SEQUENCE_LENGTH:
    raise ValueError(
        f'min_length must be at least {MIN_SEQUENCE_LENGTH} rows to hold the rest, reach, hold and '
        f'gesture segments, got {min_length}.')
  if max_length < min_length:
    raise ValueError(
        f'max_length ({max_length}) is less than min_length ({min_length}); give '
        f'max_length >= min_length.')
  if not 0.0 <= imu_only_fraction <= 1.0:
    raise ValueError(f'imu_only_fraction must be between 0 and 1, got {imu_only_fraction}.')


def _draw_device(rng: np.random.Generator) -> _Device:
  rows, columns = np.meshgrid(np.arange(_GRID) - 3.5, np.arange(_GRID) - 3.5, indexing='ij')
  rows, columns = rows.ravel(), columns.ravel()
  rest, near = [], []
  for _ in range(_TOF_COUNT):
    tilt = rng.uniform(-15.0, 15.0, size=2)
    rest.append(rng.uniform(200.0, 380.0) + tilt[0] * rows + tilt[1] * columns)
    # The face seen by one sensor: a tilted plane with a nearer bump (nose, cheek or ear).
    tilt = rng.uniform(-8.0, 8.0, size=2)
    center = rng.uniform(-2.5, 2.5, size=2)
    bump = rng.uniform(10.0, 30.0) * np.exp(
        -((rows - center[0]) ** 2 + (columns - center[1]) ** 2) / (2 * 1.8 ** 2))
    near.append(rng.uniform(50.0, 100.0) + tilt[0] * rows + tilt[1] * columns - bump)
  return _Device(
      thm_offset=rng.normal(0.0, 0.3, size=_THM_COUNT),
      thm_gain=rng.uniform(0.5, 1.0, size=_THM_COUNT),
      tof_rest=np.stack(rest), tof_near=np.stack(near))


def _draw_subject(rng: np.random.Generator, index: int) -> _Subject:
  return _Subject(
      name=f'SUBJ_{index:06d}',
      rest_pitch=rng.normal(0.3, 0.15),
      lift_angle=rng.uniform(1.2, 1.7),
      reach_speed=rng.uniform(0.8, 1.25),
      reach_length=rng.uniform(0.3, 0.45),
      ambient=rng.uniform(23.0, 27.0),
      skin=rng.uniform(33.0, 35.5),
      thm_scale=rng.uniform(0.85, 1.15),
      face_distance=rng.uniform(0.85, 1.15))


def _simulate_sequence(rng, device: _Device, subject: _Subject, sequence_id: str, length: int,
                       imu_only: bool) -> dict:
  """Simulate one sequence: labels, segment codes and (T, 332) sensor values, NaN if empty."""
  gesture = GESTURES[rng.integers(len(GESTURES))]
  gesture_name, sequence_type, peak, frequency, roll_amplitude = gesture
  orientation, body_axis, body_angle = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
  timeline = _draw_timeline(rng, length, subject.reach_speed)
  gesture_weight = _smoothstep((np.arange(length) - timeline.gesture_start) / 4.0)
  peak = min(1.0, peak * rng.uniform(0.9, 1.05))
  proximity = _proximity(rng, timeline, gesture_weight, peak, frequency)

  roll = roll_amplitude * gesture_weight * np.sin(
      2 * np.pi * frequency * np.arange(length) + rng.uniform(0, 2 * np.pi))
  # The body frame: the subject's heading about the vertical, then the posture.
  body = quaternions.multiply(
      quaternions.from_axis_angle((0.0, 0.0, 1.0), rng.uniform(-np.pi, np.pi)),
      quaternions.from_axis_angle(body_axis, body_angle))
  pitch = subject.rest_pitch + subject.lift_angle * proximity
  quaternion = _hand_quaternion(rng, body, pitch, roll)
  acceleration = _accelerometer(rng, body, quaternion, proximity, roll, subject.reach_length)

  thm = _thermopiles(rng, device, subject, proximity)
  tof = _time_of_flight(rng, device, subject, proximity)
  if imu_only:
    thm[:] = np.nan
    tof[:] = np.nan
  else:
    _drop_thermopile_spans(rng, thm)
    _drop_tof_sensor_spans(rng, tof)
  _drop_quaternion_rows(rng, quaternion)

  return {
      'sequence_id': sequence_id, 'subject': subject.name, 'gesture': gesture_name,
      'sequence_type': sequence_type, 'orientation': orientation,
      'segment': timeline.segment_codes(),
      'sensors': np.concatenate([acceleration, quaternion, thm, tof], axis=1)}


@dataclasses.dataclass(frozen=True)
class _Timeline:
  """Row boundaries of one sequence: rest, reach, hold at the target, then the gesture."""

  length: int
  reach_start: int
  reach_end: int
  gesture_start: int

  def segment_codes(self) -> np.ndarray:
    """Return each row's index into SEGMENTS."""
    codes = np.zeros(self.length, dtype=np.int64)
    codes[self.reach_end:] = 1
    codes[self.gesture_start:] = 2
    return codes


def _draw_timeline(rng, length: int, reach_speed: float) -> _Timeline:
  reach_start = max(1, round(rng.uniform(0.05, 0.15) * length))
  reach_rows = max(2, round(rng.uniform(0.2, 0.35) * length / reach_speed))
  hold_rows = max(1, round(rng.uniform(0.03, 0.08) * length))
  reach_end = min(reach_start + reach_rows, length - 2)
  gesture_start = min(reach_end + hold_rows, length - 1)
  return _Timeline(length, reach_start, reach_end, gesture_start)


def _smoothstep(x: np.ndarray) -> np.ndarray:
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3.0 - 2.0 * x)


def _proximity(
    rng, timeline: _Timeline, gesture_weight, peak: float, frequency: float) -> np.ndarray:
  """Return a smooth proximity in [0, 1]: rest, a rise to `peak`, then a small oscillation."""
  rows = np.arange(timeline.length)
  reach_rows = timeline.reach_end - timeline.reach_start
  proximity = peak * _smoothstep((rows - timeline.reach_start) / reach_rows)
  proximity += 0.04 * peak * gesture_weight * np.sin(np.pi * frequency * rows)
  # Slow drift: white noise averaged over 9 rows, standard deviation about 0.02.
  drift = np.convolve(rng.normal(0.0, 0.06, size=timeline.length + 8), np.ones(9) / 9, mode='valid')
  return np.clip(proximity + drift, 0.0, 1.0)


def _hand_quaternion(rng, body: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
  """Return the (T, 4) sensor-to-world quaternion: body, then wrist pitch, then wrist roll."""
  hand = quaternions.multiply(quaternions.from_axis_angle((0.0, 1.0, 0.0), pitch),
                              quaternions.from_axis_angle((1.0, 0.0, 0.0), roll))
  quaternion = quaternions.multiply(body, hand)
  quaternion = quaternion + rng.normal(0.0, 0.003, size=quaternion.shape)
  quaternion /= np.linalg.norm(quaternion, axis=1, keepdims=True)
  # q and -q are the same rotation, so report the one with w >= 0.
  return quaternion * np.where(quaternion[:, :1] < 0, -1.0, 1.0)


def _accelerometer(rng, body, quaternion, proximity, roll, reach_length: float) -> np.ndarray:
  """Return (T, 3) accelerometer readings in m/s²: gravity plus hand motion, in the sensor frame.

  An accelerometer at rest reads +GRAVITY along the world's up axis. Expressed in the sensor
  frame that is GRAVITY times the third row of R(q), the convention of `features`.
  """
  reach_direction = np.array([0.3, 0.0, 0.95]) / np.linalg.norm([0.3, 0.0, 0.95])
  position = reach_length * proximity[:, None] * reach_direction
  # The gesture's wrist roll also moves the hand sideways, 5 cm per radian.
  position[:, 1] += 0.05 * roll
  position = quaternions.rotate(np.broadcast_to(body, position.shape[:1] + (4,)), position)
  linear = np.gradient(np.gradient(position, axis=0), axis=0) * SAMPLE_RATE_HZ ** 2
  specific_force = linear + np.array([0.0, 0.0, features.GRAVITY])
  sensor_frame = quaternions.rotate(quaternions.conjugate(quaternion), specific_force)
  return sensor_frame + rng.normal(0.0, 0.1, size=sensor_frame.shape)


def _thermal_lag(x: np.ndarray, rate: float = 0.35, taps: int = 30) -> np.ndarray:
  """Apply a first-order low-pass (y += rate * (x - y)) starting from y = x[0]."""
  kernel = rate * (1.0 - rate) ** np.arange(taps)
  padded = np.concatenate([np.full(taps - 1, x[0]), x])
  return np.convolve(padded, kernel / kernel.sum(), mode='valid')


def _thermopiles(rng, device: _Device, subject: _Subject, proximity: np.ndarray) -> np.ndarray:
  """Return (T, 5) temperatures in °C, warming from ambient towards skin temperature."""
  heat = _thermal_lag(proximity ** 1.5)
  gain = device.thm_gain * subject.thm_scale
  warming = (subject.skin - subject.ambient) * gain * heat[:, None]
  temperature = subject.ambient + device.thm_offset + warming
  return temperature + rng.normal(0.0, 0.05, size=temperature.shape)


def _time_of_flight(rng, device: _Device, subject: _Subject, proximity: np.ndarray) -> np.ndarray:
  """Return (T, 320) integer distances, -1 beyond the range limit and for random lost pixels."""
  closeness = proximity[:, None, None] ** 0.7
  near = device.tof_near * subject.face_distance
  distance = device.tof_rest + (near - device.tof_rest) * closeness
  distance = distance + rng.normal(0.0, 2.0, size=distance.shape)
  reading = np.round(np.maximum(distance, 0.0))
  reading[distance > TOF_RANGE_LIMIT] = cmi.TOF_NO_RETURN
  reading[rng.random(reading.shape) < 0.01] = cmi.TOF_NO_RETURN
  return reading.reshape(len(proximity), -1)


def _drop_thermopile_spans(rng, thm: np.ndarray) -> None:
  """Empty a few short spans of single thermopiles, in place."""
  for _ in range(rng.poisson(0.7)):
    sensor = rng.integers(_THM_COUNT)
    span = int(rng.integers(2, 9))
    start = int(rng.integers(0, max(1, len(thm) - span)))
    thm[start:start + span, sensor] = np.nan


def _drop_tof_sensor_spans(rng, tof: np.ndarray) -> None:
  """Empty all 64 pixels of one ToF sensor for a span of rows in about a third of sequences."""
  if rng.random() < 0.35:
    sensor = rng.integers(_TOF_COUNT)
    span = int(rng.integers(5, 26))
    start = int(rng.integers(0, max(1, len(tof) - span)))
    columns = slice(sensor * cmi.CMI_TOF_PIXELS, (sensor + 1) * cmi.CMI_TOF_PIXELS)
    tof[start:start + span, columns] = np.nan


def _drop_quaternion_rows(rng, quaternion: np.ndarray) -> None:
  """Empty the quaternion at 1 to 3 rows in about a tenth of sequences."""
  if rng.random() < 0.1:
    rows = rng.choice(len(quaternion), size=int(rng.integers(1, 4)), replace=False)
    quaternion[rows] = np.nan


def _assemble_frame(parts: list[dict]) -> pl.DataFrame:
  """Concatenate simulated sequences into a frame with the CMI train.csv columns and types."""
  lengths = [len(part['segment']) for part in parts]
  segment = np.concatenate([part['segment'] for part in parts])
  behaviors = np.array([behavior for behavior, _ in SEGMENTS])
  phases = np.array([phase for _, phase in SEGMENTS])

  def per_row(key: str) -> pl.Series:
    return pl.Series(key, [part[key] for part in parts], dtype=pl.String).gather(
        np.repeat(np.arange(len(parts)), lengths))

  labels = pl.DataFrame([
      per_row('sequence_type'), per_row('sequence_id'),
      pl.Series('sequence_counter', np.concatenate([np.arange(n) for n in lengths])),
      per_row('subject'), per_row('orientation'),
      pl.Series('behavior', behaviors[segment]), pl.Series('phase', phases[segment]),
      per_row('gesture')])
  labels = labels.with_columns(pl.concat_str([
      pl.col('sequence_id'), pl.lit('_'),
      pl.col('sequence_counter').cast(pl.String).str.zfill(6)]).alias('row_id'))

  sensors = pl.from_numpy(
      np.concatenate([part['sensors'] for part in parts]), schema=list(cmi.CMI_SENSOR_COLUMNS),
      orient='row')
  # Empty cells become nulls, as when a CSV is read, and ToF distances are whole numbers (Int64).
  sensors = sensors.with_columns(pl.all().fill_nan(None)).with_columns(
      pl.col(cmi.CMI_TOF_COLUMNS).cast(pl.Int64))
  return pl.concat([labels, sensors], how='horizontal').select(cmi.CMI_TRAIN_COLUMNS)
