"""Phase 1: phase 0 plus a learned log-variance per target group (uncertainty-aware loss).

  python launch.py --config=configs/phase1.py --workdir=runs/phase1
"""

from configs import phase0


def get_config(platform: str = ''):
  config = phase0.get_config(platform)
  # Laplace form of the MAE: groups with noisier reconstructions learn a larger variance and
  # stop dominating the gradient of the easier ones.
  config.loss.kind = 'conf_mae'
  return config
