"""Benchmarking: throughput of the compiled steps and the real loop (`benchmark`), FLOP counts and
device peaks (`flops`), the Keras comparison and the tables (`benchmark_report`)."""
