"""Optional energy metering through NVIDIA's NVML (package ``nvidia-ml-py``).

The seed reports energy in joules next to accuracy. NVML exposes the total energy a GPU has
consumed since the driver loaded (``nvmlDeviceGetTotalEnergyConsumption``, millijoules, Volta and
newer); the difference between two readings is the energy of the run. Without NVML, without a
GPU, or on a GPU that does not report energy, every reading is ``None``: energy is a nice-to-have
and must never break training.
"""

from __future__ import annotations

import importlib
from typing import Any


class EnergyMeter:
    """Reads cumulative GPU energy (joules) summed over the visible devices, or ``None``.

    Examples:
        >>> meter = EnergyMeter()
        >>> meter.read() is None or meter.read() >= 0.0
        True
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            for handle in handles:  # fail now, not mid-run, if energy is unsupported
                nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:  # no package, no driver, no GPU, or no energy counter: unavailable
            return
        self._nvml, self._handles = nvml, handles

    @property
    def available(self) -> bool:
        """Whether readings are real numbers (an NVML device with an energy counter exists)."""
        return self._nvml is not None and bool(self._handles)

    def read(self) -> float | None:
        """Total energy consumed so far by all visible GPUs, in joules; ``None`` if unavailable."""
        if not self.available:
            return None
        try:
            millijoules = sum(
                self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles
            )
        except Exception:
            return None
        return float(millijoules) / 1000.0
