"""Tokenisation to webdataset shards, streaming loading, mixtures and resumable state (to come)."""
