"""Running a job: mesh and sharding, train state, the training loop, checkpoints, optimizers."""
