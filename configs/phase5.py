"""Phase 5: phase 4 plus learned positional and sensor-ID embeddings.

  python launch.py --config=configs/phase5.py --workdir=runs/phase5

A learned vector per timestep of the window is added to the time tokens. A sensor stage gives
every IMU channel, thermopile and ToF sensor its own token with a learned ID embedding, and
attention runs across the sensors of each timestep (see `models.SensorMixer`). Either can be
switched off on its own with `--config.model.positional_embedding=False` or
`--config.model.sensor_embedding=False`.
"""

from configs import phase4


def get_config(platform: str = ''):
  config = phase4.get_config(platform)
  config.model.positional_embedding = True
  config.model.sensor_embedding = True
  return config
