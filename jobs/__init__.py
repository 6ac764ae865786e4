"""One module per thing run.py can do; each exposes run(config, workdir) -> dict of metrics."""
