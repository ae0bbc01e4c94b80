"""GPU defaults without a GPU: device and dtype choice, the block-count arithmetic, NVML health with and
without NVML, the quant field of records and snapshots, and --exact-weights in the route solver."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from llmswarm.models import device as dev
from llmswarm.models import registry
from llmswarm.models.config import ModelConfig
from llmswarm.models.errors import DeviceError
from llmswarm.node.discovery.records import ServerRecord, sign_record, verify_record
from llmswarm.node.errors import WireError
from llmswarm.node.identity import peer_id_of
from llmswarm.routing import NoRouteError, ServerInfo, Snapshot, solve

MIB = 1024**2


def _gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    class _NoSwitch:  # torch.cuda.device() would initialise CUDA
        def __init__(self, *_a): ...
        def __enter__(self): return self
        def __exit__(self, *_a): return False

    monkeypatch.setattr(torch.cuda, "device", _NoSwitch)


# -- device and dtype ------------------------------------------------------------------------------------
def test_auto_is_cpu_without_a_gpu(monkeypatch):
    _gpus(monkeypatch, 0)
    assert dev.resolve_device("auto") == "cpu"
    assert dev.resolve_device(None) == "cpu"
    assert dev.resolve_dtype("auto", "cpu") == torch.float32
    assert dev.resolve_dtype(None, "cpu") == torch.float32


def test_auto_is_the_first_gpu_and_cuda_n_picks_one(monkeypatch):
    _gpus(monkeypatch, 2)
    assert dev.resolve_device("auto") == "cuda:0"
    assert dev.resolve_device("cuda") == "cuda:0"
    assert dev.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match="sees 2 GPU"):
        dev.resolve_device("cuda:2")


def test_cuda_without_a_gpu_and_unknown_devices_are_clear_errors(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(DeviceError, match="use --device cpu"):
        dev.resolve_device("cuda")
    for bad in ("tpu", "cuda:x", "mps:0"):
        with pytest.raises(DeviceError, match="unknown device"):
            dev.resolve_device(bad)
    with pytest.raises(DeviceError, match="unknown dtype"):
        dev.resolve_dtype("float64", "cpu")


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_gpu_dtype_is_bfloat16_where_supported_else_float16(monkeypatch, bf16, expected):
    _gpus(monkeypatch, 1, bf16=bf16)
    assert dev.resolve_dtype("auto", "cuda:0") == expected
    assert dev.resolve_dtype("float32", "cuda:0") == torch.float32  # an explicit choice wins


# -- block weights and the plan ------------------------------------------------------------------------------
SMOL = ModelConfig(family="llama", model_type="llama", num_blocks=30, hidden_size=576, num_heads=9, num_kv_heads=3,
                   head_dim=64, intermediate_size=1536, vocab_size=49152, norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=8192)


def test_block_weight_bytes_counts_what_loading_allocates():
    linear = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536  # q, o; k, v; gate, up, down
    norms = 2 * 576
    assert dev.block_weight_bytes(SMOL, torch.float32) == 4 * (linear + norms)
    assert dev.block_weight_bytes(SMOL, torch.bfloat16) == 2 * (linear + norms)
    int8 = dev.block_weight_bytes(SMOL, torch.bfloat16, "int8")
    nf4 = dev.block_weight_bytes(SMOL, torch.bfloat16, "nf4")
    assert 0.5 < int8 / dev.block_weight_bytes(SMOL, torch.bfloat16) < 0.55  # the target for int8
    assert nf4 < 0.6 * int8


def test_plan_takes_as_many_blocks_as_fit_with_cache_and_margin():
    # 100 MiB free, 10 MiB per block, 1 MiB cache per block capped at 5 MiB, 20 MiB margin
    plan = dev.plan_blocks(30, 100 * MIB, 10 * MIB, 1 * MIB, 5 * MIB, 20 * MIB, "test")
    # n * 10 + min(n, 5) + 20 <= 100  ->  n = 7 (70 + 5 + 20 = 95; 8 would be 105)
    assert plan.num_blocks == 7
    assert plan.cache_bytes == 5 * MIB
    line = plan.reason()
    assert "7 of 30 blocks" in line and "\n" not in line and "test" in line


def test_plan_never_exceeds_the_model_and_uncapped_cache_grows_with_blocks():
    assert dev.plan_blocks(24, 10**12, 10 * MIB, MIB, None, MIB).num_blocks == 24
    # no cap: n * (10 + 2) + 4 <= 100 -> n = 8
    plan = dev.plan_blocks(30, 100 * MIB, 10 * MIB, 2 * MIB, None, 4 * MIB)
    assert plan.num_blocks == 8 and plan.cache_bytes == 16 * MIB


def test_plan_refuses_when_not_one_block_fits():
    with pytest.raises(DeviceError, match="--quant int8"):
        dev.plan_blocks(30, 25 * MIB, 10 * MIB, MIB, None, 20 * MIB, "cuda:0 (tiny)")


def test_cpu_plan_uses_a_share_of_available_ram_with_a_cap(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 1024**3))
    free, margin, where = dev.available_memory("cpu")
    assert free == int(8 * 1024**3 * registry.CPU_RAM_FRACTION)
    assert margin == registry.CPU_MARGIN_BYTES and "CPU RAM" in where
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=10**15))
    assert dev.available_memory("cpu")[0] == registry.CPU_MAX_PLAN_BYTES
    plan = dev.plan_for_device(SMOL, "cpu", torch.float32, "none", 32768, 256 * MIB)
    assert plan.num_blocks == 30  # the whole small model fits in a capped CPU budget


def test_cuda_plan_reads_free_gpu_memory(monkeypatch):
    free_gpu = 1024**3 + 350 * MIB  # the margin (1 GiB), the default cache (256 MiB) and ~94 MiB for weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (free_gpu, 24 * 1024**3))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU")
    free, margin, where = dev.available_memory("cuda:0")
    assert free == free_gpu and margin == registry.CUDA_MARGIN_BYTES and "Fake GPU" in where
    plan = dev.plan_for_device(SMOL, "cuda:0", torch.bfloat16, "none", 32768, 256 * MIB)
    per_block = dev.block_weight_bytes(SMOL, torch.bfloat16)
    assert plan.num_blocks == (free - margin - plan.cache_bytes) // per_block == 13
    assert plan.num_blocks < dev.plan_for_device(SMOL, "cuda:0", torch.bfloat16, "int8", 32768, 256 * MIB).num_blocks


# -- NVML health ----------------------------------------------------------------------------------------------
def test_health_without_nvml_library_is_absent_not_an_error(monkeypatch):
    import pynvml
    from llmswarm.node.server.health import HealthCollector

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    h = HealthCollector("cuda:0").collect()
    assert "gpus" not in h and h["gpu"].startswith("no nvml")
    assert "ram_total_mb" in h


def test_health_with_nvml_reports_name_memory_util_temp_power(monkeypatch):
    import pynvml
    from llmswarm.node.server import health

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}", nvmlDeviceGetHandleByUUID=lambda u: "h0",
        nvmlDeviceGetName=lambda h: b"NVIDIA Fake 24GB",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * MIB * 1024, total=24 * MIB * 1024),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetTemperature=lambda h, kind: 64,
        nvmlDeviceGetPowerUsage=lambda h: 251_500,  # milliwatts
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 450_000,
    )
    monkeypatch.setattr(pynvml, "nvmlInit", fake.nvmlInit)
    for name, value in vars(fake).items():
        monkeypatch.setattr(pynvml, name, value, raising=False)
    h = health.HealthCollector("cuda:0").collect()
    assert h["gpu"] == "nvml"
    assert h["gpus"] == [{"index": 0, "name": "NVIDIA Fake 24GB", "mem_used_mb": 3072, "mem_total_mb": 24576,
                          "util_percent": 87, "temp_c": 64, "power_w": 251, "power_limit_w": 450}]


def test_status_shows_gpu_power_and_quantised_weights():
    from llmswarm.cli.status import _load, _weights

    g = {"gpus": [{"name": "RTX 4090", "util_percent": 50, "mem_used_mb": 2048, "mem_total_mb": 24576,
                   "temp_c": 60, "power_w": 300}]}
    assert "300W" in _load(g) and "60C" in _load(g)
    assert _weights({"dtype": "bfloat16", "quant": "int8"}).startswith("bfloat16") and "int8" in _weights(
        {"dtype": "bfloat16", "quant": "int8"})
    assert _weights({"dtype": "float32", "quant": "none"}) == "float32"


# -- the quant field ------------------------------------------------------------------------------------------
def _record(kp, **changes) -> ServerRecord:
    pid = peer_id_of(kp)
    base = ServerRecord(peer_id=pid, model="smollm2-135m", num_blocks=30, start=0, end=15,
                        addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{pid}"], dtype="bfloat16")
    return dataclasses.replace(base.stamped(60), **changes)


def test_record_quant_round_trips_and_old_records_read_as_none():
    kp = create_new_key_pair()
    rec = _record(kp, quant="int8")
    assert verify_record(sign_record(rec, kp.private_key)).quant == "int8"
    # a record from before the field: its signed JSON has no "quant" key
    old = _record(kp)
    body = {k: v for k, v in dataclasses.asdict(old).items() if k != "quant"}
    from llmswarm.node.discovery.records import _record_from_dict

    assert _record_from_dict(body).quant == "none"


@pytest.mark.parametrize("bad", ["", "INT8", "int 8", "x" * 17, 8, None])
def test_record_quant_is_validated(bad):
    kp = create_new_key_pair()
    with pytest.raises(WireError, match="quant"):
        verify_record(sign_record(_record(kp, quant=bad), kp.private_key))


def _snap() -> Snapshot:
    return Snapshot(num_blocks=10, servers=[
        ServerInfo("exact-a", 0, 10, inference_rps=50.0, throughput=5.0, rtt_s=0.01),
        ServerInfo("int8-a", 0, 5, inference_rps=500.0, throughput=90.0, rtt_s=0.001, quant="int8"),
        ServerInfo("nf4-b", 5, 10, inference_rps=500.0, throughput=90.0, rtt_s=0.001, quant="nf4"),
    ])


def test_snapshot_json_keeps_quant():
    again = Snapshot.loads(_snap().dumps())
    assert [s.quant for s in again.servers] == ["none", "int8", "nf4"]
    assert "quant" not in _snap().to_dict()["servers"][0]  # "none" stays implicit: older readers are unaffected


def test_exact_weights_routes_around_quantised_servers():
    fast = solve(_snap(), "exact", "latency")
    assert {h.peer_id for h in fast.chosen.chain} == {"int8-a", "nf4-b"}  # quantised but faster: chosen by default
    exact = solve(_snap(), "exact", "latency", exact_weights=True)
    assert [h.peer_id for h in exact.chosen.chain] == ["exact-a"]
    assert exact.excluded == {"int8-a": "quantised weights (int8)", "nf4-b": "quantised weights (nf4)"}
    only_quantised = Snapshot(num_blocks=10, servers=_snap().servers[1:])
    with pytest.raises(NoRouteError, match="quantised"):
        solve(only_quantised, "exact", exact_weights=True)
