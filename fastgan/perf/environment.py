"""The machine and the versions behind a measurement: one record for bench, profile, the doctor and the GPU
check (benchmarks/gpu_check.py), and the two lines every result carries."""
import platform
import subprocess

import numpy as np
import torch

from ..ops import backends
from ..usage import one_line

NVIDIA_SMI_QUERY = "name,compute_cap,memory.total,driver_version,clocks.max.sm,power.limit"


def environment(device=None):
    """A dict naming the device and the versions.  ``device``: the torch.device measured on, its properties read
    through torch; None: no query that would create a CUDA context (the GPUs as nvidia-smi names them)."""
    triton_problem = backends.triton_import_error()
    if triton_problem is None:
        import triton  # where triton imports, its version; without importing it when it is not needed

        triton_version = triton.__version__
    else:
        triton_version = f"does not import: {triton_problem}"
    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton_version, "numpy": np.__version__, "cuda": torch.version.cuda,
           "triton_interpreter": backends.interpreter_enabled()}
    if device is None:
        env.update(name=f"GPUs ({NVIDIA_SMI_QUERY}): {nvidia_smi(f'--query-gpu={NVIDIA_SMI_QUERY}')}",
                   cpu=f"{_cpu_name()}, {platform.platform()}")
    elif device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                   driver=nvidia_smi("--query-gpu=driver_version", "-i", str(device.index or 0)),
                   tf32_cudnn=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env.update(name=_cpu_name(), threads=torch.get_num_threads())
    return env


def describe(env):
    """(device, versions): the two lines a result is labelled with."""
    if "capability" in env:
        device = (f"{env['device']}, {env['name']} (sm_{env['capability'].replace('.', '')}, "
                  f"{env['memory_gib']:.0f} GiB, {env['multiprocessors']} SMs)")
        cuda = (f"driver {env['driver']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, TF32 cuDNN "
                f"{env['tf32_cudnn']} matmul {env['tf32_matmul']}, ")
    elif "threads" in env:
        device, cuda = f"{env['device']}, {env['name']} ({env['threads']} threads)", f"CUDA {env['cuda'] or 'none'}, "
    else:
        device, cuda = f"{env['name']}; host {env['cpu']}", f"CUDA {env['cuda'] or 'none'}, "
    return device, (f"{cuda}torch {env['torch']}, triton {env['triton']}, Python {env['python']}, "
                    f"numpy {env['numpy']}")


def nvidia_smi(*args):
    """nvidia-smi's answer (csv, no header), or why there is none; at most 5 s."""
    try:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown (nvidia-smi: {type(exc).__name__})"
    return one_line(out.stdout) or f"unknown (nvidia-smi: {one_line(out.stderr) or 'no output'})"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()
