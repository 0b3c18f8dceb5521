"""virtio-recovery-agent: measures virtio DEVICE_NEEDS_RESET episodes on KVM hosts."""
__version__ = "0.1.0"
