"""Quantised serving: a span's linear layers stored in int8 or nf4 with bitsandbytes.

`join --quant int8|nf4|none` (petals' choices). Why bitsandbytes: it is the maintained library petals
serves with, it has both modes in one package with CUDA kernels for each (LLM.int8 with 16-bit
outliers; nf4 with a one-token gemv path), and since 0.46 a CPU backend, so int8 runs and is tested
on CPU machines too. torchao (also tried) has faster CPU int8 but no nf4 inference kernel and warns
on import on CPU builds. bitsandbytes is an optional extra (`pip install llmswarm[quant]`, ~45 MB
wheel with every CUDA build's kernels): install.sh adds it on GPU machines and with --dev.

nf4 on CPU is refused: bitsandbytes runs it there, but one nf4 linear layer took ~20x the time of
float32 on this project's CPUs, so a CPU server should use int8 (or nothing).

Weights are quantised as they move from CPU to the serving device, one linear layer at a time, so
a GPU never holds a whole span in 16-bit (bitsandbytes quantises on that move).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import registry
from .errors import QuantError

INSTALL_HINT = "install it with `.venv/bin/pip install 'bitsandbytes>=0.46'` (or ./install.sh --quant)"


def check_quant(mode: str, device: str) -> str:
    """The mode if this machine and install can serve it, else QuantError (one line, what to do)."""
    if mode not in registry.QUANT_MODES:
        raise QuantError(f"unknown --quant {mode!r}: use one of {', '.join(registry.QUANT_MODES)}")
    if mode == "none":
        return mode
    if mode == "nf4" and not device.startswith("cuda"):
        raise QuantError("--quant nf4 needs a CUDA GPU (on CPU it is ~20x slower than float32): "
                         "use --quant int8 or --quant none on this machine")
    _bnb(mode)
    return mode


def _bnb(mode: str) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantError(f"--quant {mode} needs the bitsandbytes library, which is not installed: "
                         f"{INSTALL_HINT}") from None
    except Exception as e:  # a broken install (wrong CUDA libs) fails at import with various errors
        raise QuantError(f"--quant {mode}: bitsandbytes does not load here ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); reinstall it or use --quant none") from None
    return bnb


def quantize_blocks(blocks: nn.ModuleList, mode: str, device: str, dtype: torch.dtype) -> nn.ModuleList:
    """Replace every nn.Linear of `blocks` (on CPU) with its quantised form on `device`, and move
    the rest (norms, biases) there too. Returns the same ModuleList, changed in place."""
    check_quant(mode, device)
    if mode == "none":
        return blocks.to(device)
    bnb = _bnb(mode)
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantize_linear(bnb, child, mode, device, dtype))
        block.to(device)  # what is left: norms and the like
    return blocks


def _quantize_linear(bnb: Any, lin: nn.Linear, mode: str, device: str, dtype: torch.dtype) -> nn.Module:
    if lin.weight.device.type != "cpu":
        raise QuantError("internal: quantise a span loaded on CPU (bitsandbytes quantises on the move to the device)")
    bias = lin.bias is not None
    with torch.device("meta"):  # the float weight it would allocate is replaced just below
        if mode == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=registry.INT8_THRESHOLD)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=dtype,
                                  quant_type="nf4", quant_storage=torch.uint8)
    if mode == "int8":
        q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                     blocksize=registry.NF4_BLOCK_SIZE)
    if bias:
        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return q.to(device)


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights take as stored, quantisation scales included."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for m in module.modules():
        w = getattr(m, "weight", None)
        state = getattr(m, "state", None)
        scb = getattr(w, "SCB", None)
        if scb is None and state is not None:
            scb = getattr(state, "SCB", None)  # Linear8bitLt moves the row scales here after a forward
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total
