"""The benchmark command's measurements; each section writes one block of BENCHMARKS.md."""
