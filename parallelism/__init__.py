"""Topology, tensor/sequence parallelism, the circular pipeline, ZeRO and launch (to come)."""
