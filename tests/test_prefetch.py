"""Background batch building: same items, same order, errors where they occur."""

import threading
import time

import pytest

from imputer import prefetch


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_items_come_in_order(depth):
  assert list(prefetch.prefetch(iter(range(50)), depth)) == list(range(50))


def test_source_runs_ahead_by_depth():
  produced = []

  def source():
    for i in range(10):
      produced.append(i)
      yield i

  items = prefetch.prefetch(source(), 2)
  assert next(items) == 0
  time.sleep(0.3)
  # Item 0 is consumed, two more are queued and the thread waits to queue a fourth.
  assert len(produced) == 4
  items.close()


def test_error_is_raised_at_its_item():
  def source():
    yield 1
    yield 2
    raise RuntimeError('row 3 is broken')

  items = prefetch.prefetch(source(), 2)
  assert next(items) == 1
  assert next(items) == 2
  with pytest.raises(RuntimeError, match='row 3 is broken'):
    next(items)


def test_leaving_early_stops_the_thread():
  def endless():
    i = 0
    while True:
      yield i
      i += 1

  before = threading.active_count()
  for i in prefetch.prefetch(endless(), 2):
    if i == 5:
      break
  time.sleep(0.3)
  assert threading.active_count() == before


def test_negative_depth_is_rejected():
  with pytest.raises(ValueError, match='prefetch_depth=-1 is invalid'):
    list(prefetch.prefetch(iter(range(3)), -1))
