"""Memory and NVML samplers over a measured window of steps.

- :class:`MemoryWindow`: on CUDA the allocator's max allocated / max reserved bytes and allocation
  retries, reset at the window's start; on every device the peak RSS of this process over the window
  only (Linux: writing ``5`` to ``/proc/self/clear_refs`` resets the ``VmHWM`` high-water mark to the
  current RSS, so what warm-up allocated and freed is not counted).
- :class:`NvmlSampler`: on NVIDIA devices, a background thread samples utilization, memory used and
  power through pynvml (nvidia-ml-py); energy per step comes from the total-energy counter read at
  both ends. The device is found by UUID (or PCI bus id), never by index: NVML numbers devices
  ignoring CUDA_VISIBLE_DEVICES. Where NVML is absent the fields stay empty with one note.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where the OS cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_peak_bytes() -> int | None:
    """VmHWM: the highest RSS of this process since start or the last reset (None off Linux)."""
    kb = _vm_kb("VmHWM")
    return None if kb is None else kb * 1024


def rss_bytes() -> int | None:
    """VmRSS: this process's resident memory now (None off Linux)."""
    kb = _vm_kb("VmRSS")
    return None if kb is None else kb * 1024


class MemoryWindow:
    """Peak memory of this process between start() and stop()."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss_reset = False
        self._retries0 = 0
        self._rss0: int | None = None

    def start(self) -> None:
        """Reset the peaks (call after warm-up, device synchronized)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._retries0 = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        self._rss_reset = reset_rss_peak()
        self._rss0 = rss_bytes()

    def stop(self) -> dict[str, Any]:
        """Peaks since start(): peak_mem_bytes is CUDA max allocated on GPUs, the peak RSS on CPU."""
        row: dict[str, Any] = {"rss_start_bytes": self._rss0,
                               "peak_rss_bytes": rss_peak_bytes() if self._rss_reset else None}
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            row.update(peak_mem_bytes=torch.cuda.max_memory_allocated(self.device),
                       peak_mem_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
                       alloc_retries=stats.get("num_alloc_retries", 0) - self._retries0,
                       peak_mem_kind="cuda max allocated (reset after warm-up)")
        else:
            row.update(peak_mem_bytes=row["peak_rss_bytes"], peak_mem_reserved_bytes=None, alloc_retries=None,
                       peak_mem_kind="peak RSS over the measured window (VmHWM reset after warm-up)")
        if not self._rss_reset:
            row["mem_note"] = ("the RSS high-water mark cannot be reset here (no writable /proc/self/clear_refs): "
                               "no peak RSS over the window")
        return row


NVML_FIELDS = ("nvml_gpu_util_mean_pct", "nvml_gpu_util_max_pct", "nvml_mem_used_max_bytes", "nvml_power_mean_w",
               "nvml_energy_per_step_j", "nvml_samples")


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """This CUDA device's NVML handle, by UUID, else by PCI bus id (NVML's own numbering ignores CUDA_VISIBLE_DEVICES)."""
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return pynvml.nvmlDeviceGetHandleByPciBusId(bus)


class NvmlSampler:
    """Background NVML sampling of one CUDA device over a window; empty fields with a note where NVML is absent."""

    def __init__(self, device: torch.device, interval_s: float = 0.1) -> None:
        self.device, self.interval_s = device, interval_s
        self.note: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy0: float | None = None
        self.cpu_s = 0.0  # CPU time the sampling thread used: its cost to the training process

    def start(self) -> None:
        """Find the device in NVML and start sampling (never raises: a failure becomes the note)."""
        try:
            import pynvml

            pynvml.nvmlInit()  # first: raises LibraryNotFound on machines without the NVIDIA driver
            if self.device.type != "cuda":
                self.note = f"NVML samples only NVIDIA GPUs; this run is on {self.device.type}"
                pynvml.nvmlShutdown()
                return
            self._nvml, self._handle = pynvml, _nvml_handle(pynvml, self.device)
        except Exception as err:  # NVMLError_LibraryNotFound, no pynvml, device not found, ...
            self.note = f"NVML unavailable ({type(err).__name__}: {err}): NVML fields empty"
            self._nvml = None
            return
        self._energy0 = self._energy()
        self._thread = threading.Thread(target=self._run, name="ghostsys-nvml", daemon=True)
        self._thread.start()

    def _energy(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0  # mJ -> J
        except self._nvml.NVMLError:
            return None  # pre-Volta GPUs have no energy counter

    def _run(self) -> None:
        t0 = time.thread_time()
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                util = nv.nvmlDeviceGetUtilizationRates(h).gpu
                mem = nv.nvmlDeviceGetMemoryInfo(h).used
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0  # mW -> W
                self._samples.append((float(util), float(mem), power))
            except nv.NVMLError:
                pass
            self._stop.wait(self.interval_s)
        self.cpu_s = time.thread_time() - t0

    def stop(self, steps: int) -> dict[str, Any]:
        """Stop sampling; the window's summary (energy per step over `steps` steps)."""
        row: dict[str, Any] = dict.fromkeys(NVML_FIELDS)
        if self._nvml is None:
            row["nvml_note"] = self.note
            return row
        energy1 = self._energy()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        s = self._samples
        if s:
            row.update(nvml_gpu_util_mean_pct=sum(u for u, _, _ in s) / len(s), nvml_gpu_util_max_pct=max(u for u, _, _ in s),
                       nvml_mem_used_max_bytes=max(m for _, m, _ in s), nvml_power_mean_w=sum(p for _, _, p in s) / len(s),
                       nvml_samples=len(s))
        if self._energy0 is not None and energy1 is not None and steps:
            row["nvml_energy_per_step_j"] = (energy1 - self._energy0) / steps
        row["nvml_note"] = None if s else "NVML returned no samples in the window"
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass
        return row
