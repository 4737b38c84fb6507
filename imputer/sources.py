"""Pick the data source from the config: synthetic, a CMI table or a folder of streams."""

from __future__ import annotations

import os

from imputer import cmi
from imputer import recordings
from imputer import streams
from imputer import synthetic


def load_recordings(data_config) -> recordings.RecordingSet:
  """Load the recordings that `data.path` names; an empty path generates synthetic data."""
  path = data_config.path
  if data_config.streams and not (path and os.path.isdir(path)):
    # A preset for sensor streams that falls through to the synthetic or CMI source would
    # train on other data than it describes.
    raise ValueError(
        f'data.streams describes sensor streams, but data.path={path!r} is not a folder; set '
        '--config.data.path=FOLDER with one sub-folder per recording, or use a phase config '
        'for CMI files and synthetic data.')
  if not path:
    s = data_config.synthetic
    return synthetic.load_synthetic(
        num_subjects=s.num_subjects, sequences_per_subject=s.sequences_per_subject,
        min_length=s.min_length, max_length=s.max_length,
        imu_only_fraction=s.imu_only_fraction, seed=s.seed,
        tof_no_return=data_config.tof_no_return, tof_far_value=data_config.tof_far_value)
  if os.path.isdir(path):
    if not data_config.streams:
      raise ValueError(
          f'data.path={path!r} is a folder, which is read as sensor streams, but data.streams '
          'is empty; use a preset such as configs/bfrb_watch.py or fill data.streams.')
    specs = streams.stream_specs_from_config(data_config.streams.to_dict())
    return streams.load_streams(path, specs, data_config.stream_rate_hz,
                                data_config.stream_split_gap_s)
  if not os.path.exists(path):
    raise ValueError(
        f'data.path={path!r} does not exist; give a CMI .csv or .parquet file, a folder of '
        'sensor streams, or an empty path for synthetic data.')
  return cmi.load_cmi(path, data_config.tof_no_return, data_config.tof_far_value)
