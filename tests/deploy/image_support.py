"""Building the agent's image once per test session (podman, on the local digest-pinned Debian base
of scripts/build-base-image), for test_deploy_image.py and test_deploy_kube_play.py.

Opt-in (VRA_IMAGE_TEST=1, .ci/run sets it): the build needs root, podman, runc and debootstrap
(scripts/setup-host installs them) and Debian's and PyPI's package servers.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from deploy_support import ROOT, need_tool

IMAGE = "localhost/virtio-recovery-agent:test"
BASE = "localhost/vra-base:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PINNED = re.compile(r"^\S+@sha256:[0-9a-f]{64}$")


def podman() -> str:
    from conftest import opt_in

    opt_in("VRA_IMAGE_TEST", "build the image with podman and run it (about a minute cold, needs Debian and PyPI)")
    if os.geteuid() != 0:
        pytest.fail("VRA_IMAGE_TEST=1 needs root (rootful podman, debootstrap)")
    for tool in ("runc", "debootstrap"):
        need_tool(tool, "apt-get install podman runc debootstrap")
    return need_tool("podman", "apt-get install podman runc debootstrap")


@functools.cache
def built_image() -> str:
    """Build the image (cached layers make a rebuild after an agent change take seconds) and return its tag."""
    tool = podman()
    t0 = time.monotonic()
    base = subprocess.run([str(ROOT / "scripts" / "build-base-image"), BASE], check=True,
                          capture_output=True, text=True).stdout.strip()
    # The base goes in by digest, as the Dockerfile's default does: this exercises the pin.
    assert PINNED.match(base), f"scripts/build-base-image printed {base!r}, not a digest-pinned reference"
    t1 = time.monotonic()
    cmd = [tool, "build", "--runtime", "runc", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
           "-t", IMAGE, str(ROOT)]
    if CA_BUNDLE.exists():  # a TLS-intercepting proxy's CA, if the host trusts one
        cmd[2:2] = ["--secret", f"id=ca-certificates,src={CA_BUNDLE}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    t2 = time.monotonic()
    # Previous builds of this tag are now dangling: drop them (only this project's, by label).
    subprocess.run([tool, "image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=virtio-recovery-agent"],
                   capture_output=True)
    size = subprocess.run([tool, "image", "inspect", "--format", "{{.Size}}", IMAGE],
                          capture_output=True, text=True, check=True).stdout.strip()
    print(f"\nimage timings: base {t1 - t0:.1f}s, build {t2 - t1:.1f}s; image size {int(size) / 2**20:.0f} MiB")
    return IMAGE
