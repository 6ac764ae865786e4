"""Machinery shared by the jobs: mesh, data, checkpoints, metrics, the training loop."""
