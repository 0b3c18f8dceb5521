"""Kernel capture: BPF programs on KVM and vhost paths (BCC), decoded into agent.events.

    from agent.capture import Capture
    with Capture() as cap:          # start() attaches every hook family it can
        print(cap.hook_status)      # name -> HookStatus(name, attached, reason)
        events = cap.poll(100)

See docs/capture.md.
"""
from .capture import Capture, CaptureError, RegisterState, bpf_dir
from .hooks import FAMILIES, HookStatus
from .stats import CaptureStats, MapFill, ProgramStats

__all__ = ["Capture", "CaptureError", "CaptureStats", "FAMILIES", "HookStatus", "MapFill",
           "ProgramStats", "RegisterState", "bpf_dir"]
