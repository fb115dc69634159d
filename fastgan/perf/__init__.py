"""Measuring fastgan, over fastgan.nn; the command line and benchmarks/ use it.

    flops       FLOPs from the layer shapes: the analytic floor of a train step
    tolerances  the parity tolerances (rel-L2 per setting) that the tests and the doctor share
    bench       the side-by-side train-step benchmark (python -m fastgan bench) and its peers
    profiling   torch.profiler summary per category (python -m fastgan profile)
    doctor      correctness and speed on this machine, with a verdict (python -m fastgan doctor)
    environment the machine and the versions behind a measurement, for all of the above and benchmarks/gpu_check.py
"""
