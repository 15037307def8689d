"""Capture and restore the random number generators a forward pass on one device draws from.

A pass on an accelerator draws its dropout masks from that device's generator (CUDA's Philox state), not from
the CPU generator; CPU-side ops of the same pass (sampling, ``torch.randperm`` on the host) draw from the CPU
generator. Replaying a pass exactly (gradient accumulation's recomputation) needs both restored, as
``torch.random.fork_rng(devices=[index], device_type=...)`` forks them; here the states are kept as values, so
several of them can be held and restored in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CPU_ONLY = ("cpu", "meta")


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and, for an accelerator, the state of the generator of ``device``.

    Attributes:
        cpu: ``torch.get_rng_state()``.
        device: the accelerator whose generator ``accelerator`` holds (``None`` on CPU).
        accelerator: ``torch.get_device_module(device.type).get_rng_state(device)``, or ``None`` on CPU.
    """

    cpu: torch.Tensor
    device: torch.device | None = None
    accelerator: torch.Tensor | None = None


def capture_rng(device: torch.device) -> RngState:
    """The generator states a pass on ``device`` draws from: the CPU one, and ``device``'s own unless it is the CPU.

    A device without an index (``cuda``) means the current device of its type, as in ``torch.cuda.get_rng_state``.
    """
    if device.type in _CPU_ONLY:
        return RngState(torch.get_rng_state())
    module = torch.get_device_module(device.type)
    return RngState(torch.get_rng_state(), device, module.get_rng_state(device))


def restore_rng(state: RngState) -> None:
    """Put every generator captured in ``state`` back to where it was."""
    torch.set_rng_state(state.cpu)
    if state.device is not None:
        torch.get_device_module(state.device.type).set_rng_state(state.accelerator, state.device)
