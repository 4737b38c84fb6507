"""Phase 3: phase 2 plus two-view consistency regularisation.

  python launch.py --config=configs/phase3.py --workdir=runs/phase3

Each batch gets two independent masks, and the two reconstructions must agree where both
views saw the value. This trains the model to give the same answer whatever else is hidden.
"""

from configs import phase2


def get_config(platform: str = ''):
  config = phase2.get_config(platform)
  config.lambda_cons = 0.1
  config.consistency.positions = 'both_visible'
  return config
