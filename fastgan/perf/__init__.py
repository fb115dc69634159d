"""Measuring fastgan: FLOPs and the analytic floor (flops), the side-by-side train-step benchmark (bench)
and the profiler summary (profiling).  Built on fastgan.nn; the command line and benchmarks/ use it."""
