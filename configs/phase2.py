"""Phase 2: phase 1 plus curriculum masking.

  python launch.py --config=configs/phase2.py --workdir=runs/phase2

The mask ratio starts low, so the model first learns from mostly visible targets, and rises
to a harder ratio over the first 10 epochs (a fifth of the default 50), then stays there.
"""

from configs import phase1


def get_config(platform: str = ''):
  config = phase1.get_config(platform)
  config.mask_start = 0.3
  config.mask_end = 0.75
  config.mask_epochs = 10
  return config
