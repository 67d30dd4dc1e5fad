"""Topology, tensor/sequence parallelism, the circular pipeline, ZeRO, gradient reduction and
launch/rank discovery; the model is known only through core/model_interface.py."""
