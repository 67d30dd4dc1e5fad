"""SLURM: render and submit batch jobs that requeue themselves after preemption, job status."""
