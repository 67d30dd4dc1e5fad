"""A run's directory and life: who owns it (the run lock), preemption to an agreed checkpoint,
and `pretrain status`."""
