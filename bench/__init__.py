"""Benchmarks: measurement only. Imports wanda_kernels and pruning, never the reverse."""
