"""The exit statuses of `pretrain` (the contract SLURM scripts and sweeps rely on)."""

EXIT_CONFIG = 2  # a configuration, data or checkpoint problem: one line naming it, no traceback
EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite steps
EXIT_PEER_LOST = 4  # a peer rank died (the watchdog names it)
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1 after a sealed checkpoint: requeue, then --resume auto
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) after a sealed checkpoint: the user's stop, no requeue
# written by rank 0 into the run directory beside exiting EXIT_PREEMPTED: srun's step code is
# not always 75 (--kill-on-bad-exit terminates the ranks still exiting when the first leaves:
# 143), so the batch script requeues on this file as well
PREEMPTED_MARKER = ".preempted"
