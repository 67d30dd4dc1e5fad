"""Scaling-law sweeps: expand a spec into runs, run or submit them, collect, fit, plot."""
