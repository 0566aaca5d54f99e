"""The ``profile`` wing: what each mode costs (imports ``run`` and ``nn``).

``callback`` (ProfileCallback: timed window, memory, NVML, traces, instrumenting the loop from above
through its callbacks), ``samplers`` (memory window, NVML sampler), ``collectives`` (the collectives'
share by caller from torch.profiler traces), ``sweep`` (ProfileConfig and the runs it expands to),
``driver`` (each run through its real launcher, scaling efficiency, the table), ``overhead`` (the
loop against a bare PyTorch loop: ``python -m ghostsys.profile.overhead``). DESIGN §4, §6, §9.
"""

from ghostsys.profile.sweep import ProfileConfig

__all__ = ["ProfileConfig"]
