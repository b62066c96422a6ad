"""The application: the runner behind the demo and the benchmark, the Python API, reports, results, loading."""
