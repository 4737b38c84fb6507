"""What differs between CPU, GPU and TPU runs of the same config.

Every config file takes the platform after a colon, CPU by default:

  python launch.py --config=configs/phase3.py:gpu --workdir=runs/phase3_gpu
  python launch.py --config=configs/bfrb_watch.py:phase4:tpu --config.data.path=... ...

The platform sets only how the run uses the hardware, never the model or the objective:
- `per_device_batch_size`: with a value above 0, launch sets batch_size to it times the
  number of devices of every process, and eval_batch_size to 4 times that.
- `mesh`: 'flat' lays the `data` axis over jax.devices() in their order, 'topology' takes
  the order of jax's mesh_utils, which follows the chips' interconnect.
- `model.compute_dtype`: bfloat16 on accelerators with bfloat16 matmul units.
- `matmul_precision`: jax's default matmul precision for float32 matmuls ('default' lets a
  GPU use TF32 and a TPU use bfloat16 passes, and 'highest' requests full float32).
- `prefetch_depth`: batches built ahead on the host.
The GPU and TPU values are starting points that no accelerator run has tuned yet. Any of
them can be overridden on the command line as usual.
"""

PLATFORMS = ('cpu', 'gpu', 'tpu')

SETTINGS = {
    # The CPU runs the reference numerics: float32 throughout and the global batch as given.
    # Batches are built on the loop thread: jax dispatches each step asynchronously, so the
    # next batch is built while the step runs, and a prefetch thread would only compete with
    # XLA's threads for the cores (measured in docs/benchmarks.md).
    'cpu': {'per_device_batch_size': 0, 'mesh': 'flat', 'compute_dtype': 'float32',
            'matmul_precision': 'default', 'prefetch_depth': 0},
    'gpu': {'per_device_batch_size': 64, 'mesh': 'topology', 'compute_dtype': 'bfloat16',
            'matmul_precision': 'default', 'prefetch_depth': 4},
    'tpu': {'per_device_batch_size': 64, 'mesh': 'topology', 'compute_dtype': 'bfloat16',
            'matmul_precision': 'default', 'prefetch_depth': 4},
}


def apply(config, platform: str):
  """Set the fields of `platform` ('' means cpu) on `config` and return it."""
  platform = platform or 'cpu'
  if platform not in PLATFORMS:
    raise ValueError(f'unknown platform {platform!r} after the config path; use one of '
                     f'{", ".join(PLATFORMS)}, for example --config=configs/phase3.py:gpu.')
  settings = SETTINGS[platform]
  config.platform = platform
  config.per_device_batch_size = settings['per_device_batch_size']
  config.mesh = settings['mesh']
  config.model.compute_dtype = settings['compute_dtype']
  config.matmul_precision = settings['matmul_precision']
  config.prefetch_depth = settings['prefetch_depth']
  return config
