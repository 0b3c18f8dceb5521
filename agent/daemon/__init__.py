"""The parts of `virtio-recovery-agent run` (agent/run.py): its options (options), start-up
and its refusals (startup, native_output), the event loop (loop) with its state file (restarts),
readiness before and after start (readiness) and the diagnostic log (logs)."""
