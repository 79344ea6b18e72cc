"""Code that both services (and the tests and benchmarks) import."""
