"""Profile the compiled training step and print where its time goes, op by op.

  python benchmarks/profile_step.py --config=configs/phase0.py --steps=10 --trace_dir=/tmp/trace

The step is built and compiled as train_step.py builds it. After --warmup untimed steps, the
script records --steps steps with jax.profiler (a Perfetto trace, which also opens in
ui.perfetto.dev or TensorBoard), then reads the trace back. Each XLA op of the compiled
program is matched with the op_name that JAX recorded in the HLO, which names the Flax module
and the jax function it came from, such as
`jvp(MaskedImputer)/encoder/TransformerBlock_0/MlpBlock_0/Dense_0/dot_general`. A
`transpose(jvp(...))` prefix marks the backward pass. The script prints:

- the device time per step, and the share of matmuls ('dot' and XNNPACK/YNNPACK fusions on
  the CPU), convolutions, reduce-window (the cumulative maxima of the interpolation) and the
  rest.
- the time per step of each top-level scope (the embedding, the encoder, the decoder, the
  heads, and the masks and losses outside the model), forward and backward apart.
- the --top slowest ops with their scope.

It takes the flags of train_step.py (--config, --steps, --warmup) plus --trace_dir and --top.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY_ROOT not in sys.path:
  sys.path.insert(0, _REPOSITORY_ROOT)

from absl import app
from absl import flags
import jax

from benchmarks import train_step as train_step_benchmark
from imputer import sharding
from imputer import train

_CONFIG = train_step_benchmark._CONFIG
_STEPS = train_step_benchmark._STEPS
_WARMUP = train_step_benchmark._WARMUP
_TRACE_DIR = flags.DEFINE_string('trace_dir', None, 'Folder for the trace; a temporary one '
                                 'when not set.')
_TOP = flags.DEFINE_integer('top', 25, 'Slowest ops to list.', lower_bound=0)

# Trace events that are not ops of the compiled program: the runtime's own spans.
_RUNTIME_EVENTS = ('ThunkExecutor', '$', 'PjitFunction', 'CommonPjRt', 'SlinkyThreadPool')
_SCOPES_SHOWN = 20  # The smaller scopes are summed into one line.


def op_names(hlo_text: str) -> dict[str, str]:
  """Map each HLO instruction name to the op_name metadata that JAX gave it."""
  pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', re.M)
  return {m.group(1): m.group(2) for m in pattern.finditer(hlo_text)}


def read_trace(trace_dir: str) -> list[dict]:
  """Return the complete ('X') events of the newest Perfetto trace under `trace_dir`."""
  files = sorted(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*',
                                        'perfetto_trace.json.gz')))
  if not files:
    raise RuntimeError(f'no perfetto_trace.json.gz under {trace_dir}; the profiler wrote no '
                       'trace.')
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [e for e in events if e.get('ph') == 'X' and not e['name'].startswith(_RUNTIME_EVENTS)]


def category(op: str) -> str:
  if op.startswith(('dot', 'ynn_fusion', 'xnn_fusion')):
    return 'matmul'
  if op.startswith(('conv', 'convolution')):
    return 'convolution'
  if 'reduce-window' in op:
    return 'reduce-window'
  return 'other'


def scope(op_name: str) -> str:
  """Return 'forward|backward: <first module scope>' for one op_name, or its jax function."""
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  parts = [p for p in op_name.split('/') if p and not p.startswith(('jit(', 'pjit'))]
  cleaned = [re.sub(r'^(transpose\()?(jvp\()?', '', p).rstrip(')') for p in parts]
  if cleaned and cleaned[0] == 'MaskedImputer' and len(cleaned) > 1:
    return f'{direction}: model/{cleaned[1]}'
  if cleaned and cleaned[0].startswith('state.'):
    return 'optimizer: update of the state'
  return f'{direction}: outside the model/{cleaned[0] if cleaned else "unnamed"}'


def summarise(events, names: dict[str, str], steps: int, top: int) -> str:
  total = sum(e['dur'] for e in events) / 1e3 / steps
  by_category, by_scope, by_op = (collections.Counter() for _ in range(3))
  for event in events:
    milliseconds = event['dur'] / 1e3 / steps
    op_name = names.get(event['name'], '')
    by_category[category(event['name'])] += milliseconds
    by_scope[scope(op_name) if op_name else 'no op_name (runtime or fused loops)'] += milliseconds
    by_op[(event['name'], op_name)] += milliseconds
  lines = [f'device time per step: {total:.1f} ms (the ops of the compiled step, summed)', '']
  lines += [f'{name:<16}{ms:>9.2f} ms {ms / total:>6.1%}' for name, ms in by_category.most_common()]
  lines += ['', 'by scope:']
  scopes = by_scope.most_common()
  lines += [f'{ms:>9.2f} ms {ms / total:>6.1%}  {name}' for name, ms in scopes[:_SCOPES_SHOWN]]
  rest = sum(ms for _, ms in scopes[_SCOPES_SHOWN:])
  if rest:
    lines.append(f'{rest:>9.2f} ms {rest / total:>6.1%}  {len(scopes) - _SCOPES_SHOWN} smaller scopes')
  lines += ['', f'{top} slowest ops:']
  lines += [f'{ms:>9.2f} ms  {op[:28]:<28} {op_name[-90:]}'
            for (op, op_name), ms in by_op.most_common(top)]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  data = train.prepare_data(config)
  mesh = sharding.make_mesh(config.mesh)
  state, compiled = train_step_benchmark.compile_train_step(config, data, mesh)
  steps = _STEPS.value
  batches = [train_step_benchmark.assemble_batch(config, data, mesh, s)
             for s in range(_WARMUP.value + steps)]
  state, _ = train_step_benchmark.time_prebuilt(compiled, state, batches[:_WARMUP.value])
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix='imputer_trace_')
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  state, seconds = train_step_benchmark.time_prebuilt(compiled, state,
                                                      batches[_WARMUP.value:])
  jax.profiler.stop_trace()
  print(f'{steps} traced steps took {seconds:.3f} s of wall time; trace in {trace_dir}')
  print(summarise(read_trace(trace_dir), op_names(compiled.as_text()), steps, _TOP.value))


if __name__ == '__main__':
  app.run(main)
