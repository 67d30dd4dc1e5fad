"""The exit statuses of `pretrain` (the contract SLURM scripts and sweeps rely on)."""

EXIT_CONFIG = 2  # a configuration, data or checkpoint problem: one line naming it, no traceback
EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite steps
EXIT_PEER_LOST = 4  # a peer rank died (the watchdog names it)
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1 after a sealed checkpoint: requeue, then --resume auto
