"""Everything that touches data: datasets, views, the cache stores, the Ray job, the trainer, the CLI."""
