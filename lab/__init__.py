"""The KVM virtio lab: a freestanding scripted-driver guest (lab/guest) and its QEMU harness."""
from lab.harness import (  # noqa: F401
    BootInfo, DeviceInfo, Episode, GuestSpec, LabError, LabResult, LabTimeout, LabVM, Storm,
    StatusWrite, ensure_guest, qemu_command, run,
)
