"""Build the next training batches on a background thread while the device runs a step.

The training loop needs the batch of step k, and without prefetching it waits while the
host gathers the rows and copies them to the device. `prefetch` runs an iterator of device
batches ahead on one background thread, keeping up to `depth` finished batches queued. The
batches and their order are exactly those of the iterator, so a run with prefetching equals
one without, step for step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_DONE = object()


class _Failure:
  """An exception raised by the source iterator, passed to the consumer to raise again."""

  def __init__(self, error: BaseException):
    self.error = error


def prefetch(source: Iterator[Any], depth: int) -> Iterator[Any]:
  """Yield the items of `source`, computed up to `depth` items ahead on a background thread.

  With `depth` 0 the items are computed on demand, on the calling thread. An exception in
  `source` is raised in the caller at the item where it occurred. Closing the generator (or
  leaving a loop over it early) stops the thread after its current item.
  """
  if depth < 0:
    raise ValueError(f'prefetch_depth={depth} is invalid; use 0 (off) or more batches.')
  if depth == 0:
    yield from source
    return
  items: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    """Queue `item` unless the consumer has stopped; return whether it was queued."""
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def fill() -> None:
    try:
      for item in source:
        if not put(item):
          return
      put(_DONE)
    except BaseException as error:  # pylint: disable=broad-except
      put(_Failure(error))

  worker = threading.Thread(target=fill, name='batch-prefetch', daemon=True)
  worker.start()
  try:
    while True:
      item = items.get()
      if item is _DONE:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    worker.join(timeout=5.0)
