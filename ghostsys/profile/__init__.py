"""The ``profile`` wing: what each mode costs (imports ``run`` and ``nn``).

Timers, memory and NVML samplers, the collectives' share from profiler traces, and device-count
sweeps; they instrument the training loop from above through its callbacks (DESIGN §4, §6).
"""
