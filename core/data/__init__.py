"""Images in: sources (folder, TFDS, built-in), preprocessing, the deterministic batch pipeline."""
