"""The algorithm: caches, the fuser, sampling, trees, the engine, the metrics."""
