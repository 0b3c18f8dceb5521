"""The real Linux guest: Debian's cloud kernel and busybox under QEMU TCG, its virtio devices
broken from the host, and QEMU's trace of the run converted to agent.events (docs/lab.md,
"Real Linux under TCG").

    build.py    downloads the .debs (apt-get download) and makes vmlinuz + initramfs
    init.sh     the guest's /init: loads the virtio modules, makes traffic, reports
    vm.py       starts QEMU (TCG, shared RAM, QMP, trace), parses the serial report
    fault.py    breaks a virtqueue through QMP and the shared RAM file
    trace.py    parses QEMU's trace log and converts it to agent.events
    forward.py  keeps what the agent's capture would forward
    run.py      one run: boot, traffic, fault, convert, correlate; the JSON summary
"""
