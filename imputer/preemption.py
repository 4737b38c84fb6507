"""Stop training cleanly on SIGTERM or SIGINT: save a checkpoint, then leave.

Cloud TPU VMs and most cluster schedulers announce a preemption with SIGTERM, and Ctrl-C sends
SIGINT. While a training loop runs inside `Watch`, either signal only records the request.
The loop calls `Watch.should_stop(step)` after every step. When it answers yes, the loop
saves a checkpoint of that step and raises `Preempted`, and launch.py exits with status
128 + the signal's number after logging where the run stopped. Running the same command again
resumes from that checkpoint, and the resumed run continues exactly as an uninterrupted one
(the data order, the masks and the schedules are functions of the step).

With several processes (jax.distributed), every process must save the same step. There the
SIGTERM handler is JAX's own preemption service, which agrees on a step across processes
(`multihost_utils.reached_preemption_sync_point`). SIGINT keeps its default behaviour there
(KeyboardInterrupt in the process that gets it), because one process stopping alone would
leave the others waiting in the next collective.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Training stopped at `step` on `signal_name`, after saving a checkpoint of that step."""

  def __init__(self, step: int, signal_name: str, workdir: str):
    self.step = step
    self.signal_name = signal_name
    self.exit_status = 128 + int(getattr(signal, signal_name, signal.SIGTERM))
    super().__init__(
        f'{signal_name} received: training stopped after step {step} and saved a checkpoint '
        f'of it in {workdir}. Run the same command again to resume from there.')


class Watch:
  """Recorder of SIGTERM and SIGINT during training, as the module docstring describes.

  Use as a context manager around the training loop. Outside the main thread, where Python
  cannot install signal handlers, nothing is installed and only JAX's multi-process
  preemption service can stop the loop.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous: dict = {}

  def __enter__(self) -> 'Watch':
    if threading.current_thread() is not threading.main_thread():
      return self
    signals = [signal.SIGTERM, signal.SIGINT]
    if jax.process_count() > 1:
      signals = []  # JAX's preemption service handles SIGTERM across the processes.
    for number in signals:
      self._previous[number] = signal.signal(number, self._record)
    return self

  def __exit__(self, *exc_info) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous.clear()

  def _record(self, number, frame) -> None:
    del frame
    name = signal.Signals(number).name
    if self.received is not None and number == signal.SIGINT:
      raise KeyboardInterrupt(f'SIGINT after {self.received}: stopping without a checkpoint')
    self.received = name
    logging.warning('%s received: the run saves a checkpoint after the current step and '
                    'stops (press Ctrl-C again to stop at once, without one).', name)

  def should_stop(self, step: int) -> bool:
    """Return whether training should save `step` and stop. Call it after every step.

    Without jax.distributed the multi-process check returns False at once, so the call costs
    no device synchronisation.
    """
    if multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or 'SIGTERM'
      return True
    return self.received is not None
