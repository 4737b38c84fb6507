"""Phase 0: shared decoder with one light head per target group, trained with a plain loss.

  python launch.py --config=configs/phase0.py --workdir=runs/phase0
"""

from configs import default


def get_config(platform: str = ''):
  config = default.get_config(platform)
  config.model.decoder = 'shared'  # One trunk for all groups instead of one decoder each.
  # MAE is robust to the heavy tails of ToF distances and THM spikes; 'huber' also fits here.
  config.loss.kind = 'mae'
  return config
