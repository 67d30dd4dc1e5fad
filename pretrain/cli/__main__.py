"""`python -m pretrain.cli` (what torchrun, srun and the sbatch template run)."""

import sys

from pretrain.cli import main

sys.exit(main())
