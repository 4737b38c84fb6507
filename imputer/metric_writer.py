"""Scalars and images to tensorboardX event files and to `metrics.jsonl` in the workdir.

Only process 0 writes; on other processes every method is a no-op, so the training loop can
call the writer unconditionally.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  """Write each scalar once to tensorboardX and once to a JSON line `{"step", name: value}`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._summary = SummaryWriter(logdir=workdir)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    for name, value in sorted(scalars.items()):
      value = float(value)
      self._summary.add_scalar(name, value, global_step=int(step))
      # JSON has no NaN; a non-finite value is written as a string so the line stays valid.
      record[name] = value if math.isfinite(value) else str(value)
    self._jsonl.write(json.dumps(record) + '\n')

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """Write (H, W) or (H, W, 3) float images with values in [0, 1]."""
    if not self.enabled:
      return
    for name, image in images.items():
      image = np.asarray(image, np.float32)
      dataformats = 'HW' if image.ndim == 2 else 'HWC'
      self._summary.add_image(name, image, global_step=int(step), dataformats=dataformats)

  def flush(self) -> None:
    if self.enabled:
      self._summary.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._summary.close()
      self._jsonl.close()
