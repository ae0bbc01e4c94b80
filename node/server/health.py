"""A server's health figures, measured with psutil and nvidia-ml-py once per announcement.

`HealthCollector(device).collect(...)` returns a small JSON-able dict that goes into
`ServerRecord.health` (capped at config.MAX_RECORD_HEALTH_BYTES). Fields (all optional to readers):

    cpu_percent        float  system-wide CPU use since the previous call, percent
    ram_used_mb        int    system RAM in use, MiB
    ram_total_mb       int
    rss_mb             int    this process's resident memory, MiB
    gpus               list   one entry per GPU this server uses:
                              {"index", "name", "mem_used_mb", "mem_total_mb", "util_percent", "temp_c",
                               "power_w", "power_limit_w"}
    gpu                str    "nvml" when `gpus` is filled; otherwise why not ("cpu device", "no nvml: ...")
    sessions           int    open inference sessions
    tokens_served      int    tokens run through the span since start (prefill + decode)
    cache_tokens_in_use int   KV-cache tokens reserved by open sessions

Never raises for lack of a GPU, NVML or psutil: a figure it cannot read is left out.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from llmswarm.node import config

log = logging.getLogger(__name__)
_MB = 1024 * 1024


def gpu_indices(device: str) -> list[int]:
    """The CUDA device indices a torch device string uses ("cuda" -> [0], "cuda:1" -> [1], "cpu" -> [])."""
    if not device.startswith("cuda"):
        return []
    _, _, idx = device.partition(":")
    return [int(idx)] if idx.isdigit() else [0]


class HealthCollector:
    """Cheap to call: psutil's non-blocking CPU counter and a few NVML queries."""

    def __init__(self, device: str = "cpu") -> None:
        self.indices = gpu_indices(device)
        self._nvml: Any = None
        self._gpu_note = "cpu device" if not self.indices else ""
        if self.indices:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._gpu_note = "nvml"
            except Exception as e:  # no driver, no library, no GPU: report CPU figures only
                self._gpu_note = f"no nvml: {type(e).__name__}"[: config.MAX_RECORD_STRING_CHARS]
        try:
            import psutil

            self._psutil: Any = psutil
            self._proc = psutil.Process()
            psutil.cpu_percent(interval=None)  # prime the counter: the next call measures since now
        except Exception:  # pragma: no cover - psutil is a dependency
            self._psutil = None

    def collect(self, *, sessions: int = 0, tokens_served: int = 0, cache_tokens_in_use: int = 0) -> dict[str, Any]:
        h: dict[str, Any] = {"sessions": sessions, "tokens_served": tokens_served,
                             "cache_tokens_in_use": cache_tokens_in_use, "gpu": self._gpu_note}
        if self._psutil is not None:
            try:
                vm = self._psutil.virtual_memory()
                h.update(cpu_percent=round(self._psutil.cpu_percent(interval=None), 1),
                         ram_used_mb=int((vm.total - vm.available) / _MB), ram_total_mb=int(vm.total / _MB),
                         rss_mb=int(self._proc.memory_info().rss / _MB))
            except Exception as e:
                log.debug("psutil failed: %s", e)
        if self._nvml is not None:
            h["gpus"] = [g for g in (self._gpu(i) for i in self.indices) if g]
        return _trim(h)

    def _gpu(self, index: int) -> dict[str, Any]:
        nv = self._nvml
        try:
            handle = _handle(nv, index)
            name = nv.nvmlDeviceGetName(handle)
            g: dict[str, Any] = {"index": index, "name": (name.decode() if isinstance(name, bytes) else name)[:64]}
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            g.update(mem_used_mb=int(mem.used / _MB), mem_total_mb=int(mem.total / _MB))
        except Exception as e:
            log.debug("nvml failed for GPU %d: %s", index, e)
            return {}
        for key, read in (("util_percent", lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu),
                          ("temp_c", lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
                          ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000),  # milliwatts
                          ("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000)):
            try:
                g[key] = int(read())
            except Exception:  # some GPUs (MIG slices, vGPUs) do not report these
                pass
        return g


def _handle(nv: Any, index: int) -> Any:
    """NVML handle of torch's cuda:`index`. NVML counts every GPU of the machine while torch counts
    only those CUDA_VISIBLE_DEVICES leaves, so match by UUID where torch knows it."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception:
        return nv.nvmlDeviceGetHandleByIndex(index)


def _trim(h: dict[str, Any]) -> dict[str, Any]:
    """Stay under the record's health budget: drop GPU entries from the end if ever needed."""
    while len(json.dumps(h)) > config.MAX_RECORD_HEALTH_BYTES and h.get("gpus"):
        h["gpus"] = h["gpus"][:-1]
    return h
