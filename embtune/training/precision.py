"""Which precision the encoder computes in: bf16 autocast where the hardware multiplies bf16 natively.

bf16 (8 exponent bits, as fp32; 8 significand bits) autocast runs the matrix products in bf16 and keeps
fp32 master weights, optimiser state and gradients (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep
Learning Training"). It pays only where the products run on bf16 hardware: CUDA devices that support it
(``torch.cuda.is_bf16_supported``) and x86 CPUs with AVX512-BF16 dot products or AMX tiles (Intel Cooper
Lake / Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere oneDNN emulates bf16 by converting to
fp32, slower than fp32 itself, so ``true`` is refused there and ``auto`` (the default) is fp32 there.
Measured on an AMD EPYC with AVX512-BF16 (docs/performance.md): SciFact NDCG@10 after one epoch in bf16
autocast against fp32, three seeds, and the base model's score with bf16 encoding against fp32's.
"""

from __future__ import annotations

from pathlib import Path

import torch

# /proc/cpuinfo flags of native bf16 dot products (AVX512-BF16 VDPBF16PS; AMX TDPBF16PS)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
SETTINGS = ("auto", True, False)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The ``flags`` of the first processor in ``cpuinfo`` (Linux); None when the file is unreadable or
    has no flags line (not Linux, not x86)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return None


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 dot products natively: one of :data:`BF16_CPU_FLAGS` among
    ``flags`` (default: :func:`cpu_flags`); without a cpuinfo file, what torch's own CPU probe says."""
    flags = cpu_flags() if flags is None else flags
    if flags is not None:
        return any(f in flags for f in BF16_CPU_FLAGS)
    probe = getattr(torch, "cpu", None)
    caps = probe.get_capabilities() if hasattr(probe, "get_capabilities") else {}
    return any(bool(caps.get(f)) for f in BF16_CPU_FLAGS)


def use_bf16(setting, device: torch.device | str, option: str = "train.bf16",
             flags: frozenset[str] | None = None) -> bool:
    """Whether to compute in bf16 autocast on ``device`` for ``setting`` of ``option``.

    ``auto``: bf16 where the device computes it natively (a CUDA device that supports it; a CPU with
    :data:`BF16_CPU_FLAGS`), fp32 elsewhere.
    ``true``: bf16, required: refused where the device has no native bf16 (:func:`cpu_has_bf16`, ``flags``
    for tests; on a CPU it would be emulated, slower than fp32). ``false``: fp32.

    Raises:
        ValueError: ``setting`` not auto/true/false, or true on a device without native bf16, naming
            ``option``.
    """
    if isinstance(setting, str):  # as a command line or an old config may write it
        setting = {"true": True, "false": False}.get(setting.strip().lower(), setting.strip().lower())
    if setting not in SETTINGS or not isinstance(setting, (bool, str)):  # not 1, 0 or "yes"
        raise ValueError(f"{option} must be auto, true or false, got {setting!r}")
    if setting is False:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        native = cpu_has_bf16(flags)
    else:
        native = False
    if setting is True and not native:
        why = f"no {' or '.join(BF16_CPU_FLAGS)} CPU flag" if device.type == "cpu" else "not supported"
        raise ValueError(f"{option}=true, but this {device.type} device has no native bf16 ({why}): it would be "
                         f"emulated, slower than fp32; use {option}=auto or false")
    return native


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 natively (``train.bf16=true`` is accepted there)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def precision_name(bf16: bool) -> str:
    """What a run records: ``bf16-autocast`` (bf16 products, fp32 master weights) or ``fp32``."""
    return "bf16-autocast" if bf16 else "fp32"
