"""Build the real Linux guest from Debian packages: vmlinuz and a busybox initramfs.

The .debs are fetched with `apt-get download` into lab/linux/cache/ and unpacked with
`dpkg-deb`; the kernel and initramfs go to lab/linux/build/. Both directories are gitignored:
no binary is committed. Rebuilt only when init.sh or the packages change.
"""
from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
BUILD = HERE / "build"
INIT = HERE / "init.sh"
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
# insmod order (no modules.dep in the package: depmod runs at install time)
MODULES = {
    "virtio_ring": "drivers/virtio/virtio_ring.ko",
    "virtio": "drivers/virtio/virtio.ko",
    "virtio_pci_modern_dev": "drivers/virtio/virtio_pci_modern_dev.ko",
    "virtio_pci_legacy_dev": "drivers/virtio/virtio_pci_legacy_dev.ko",
    "virtio_pci": "drivers/virtio/virtio_pci.ko",
    "virtio-rng": "drivers/char/hw_random/virtio-rng.ko",
    "failover": "net/core/failover.ko",
    "net_failover": "drivers/net/net_failover.ko",
    "virtio_net": "drivers/net/virtio_net.ko",
    "virtio_blk": "drivers/block/virtio_blk.ko",
}


class BuildError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} is not installed") from None
    if p.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return p.stdout


def kernel_package() -> str:
    """The versioned image package the metapackage depends on (linux-image-6.1.0-N-cloud-amd64)."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise BuildError(f"apt-cache depends {KERNEL_META}: no linux-image dependency")


def download(package: str) -> Path:
    """The package's .deb in the cache (downloaded once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"{package}_*.deb"))
    if not found:
        _run(["apt-get", "download", package], cwd=CACHE)
        found = sorted(CACHE.glob(f"{package}_*.deb"))
    if not found:
        raise BuildError(f"apt-get download {package} left no .deb in {CACHE}")
    return found[-1]


class Cpio:
    """A newc cpio archive, in memory (the initramfs is a few MB)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        self.buf.write(head + name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def close(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _stamp(debs: list[Path]) -> str:
    return "\n".join([d.name for d in debs] + [INIT.read_text()])


def ensure_guest() -> tuple[Path, Path]:
    """(vmlinuz, initramfs), built if missing or stale."""
    kdeb = download(kernel_package())
    bdeb = download(BUSYBOX)
    kernel, initrd, stamp = BUILD / "vmlinuz", BUILD / "initramfs.cpio.gz", BUILD / "stamp"
    want = _stamp([kdeb, bdeb])
    if kernel.exists() and initrd.exists() and stamp.exists() and stamp.read_text() == want:
        return kernel, initrd
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vra-linux-") as tmp:
        root = Path(tmp)
        _run(["dpkg-deb", "-x", str(kdeb), str(root / "k")])
        _run(["dpkg-deb", "-x", str(bdeb), str(root / "b")])
        vmlinuz = sorted((root / "k" / "boot").glob("vmlinuz-*"))
        moddirs = sorted((root / "k" / "lib" / "modules").glob("*"))
        if not vmlinuz or not moddirs:
            raise BuildError(f"{kdeb.name}: no vmlinuz or modules")
        busybox = root / "b" / "bin" / "busybox"
        if not busybox.exists():
            raise BuildError(f"{bdeb.name}: no bin/busybox")
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
            cpio.dir(d)
        cpio.file("init", INIT.read_bytes(), 0o755)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for name, rel in MODULES.items():
            ko = moddirs[-1] / "kernel" / rel
            if not ko.exists():
                raise BuildError(f"{kdeb.name}: no {rel}")
            cpio.file(f"lib/modules/{name}.ko", ko.read_bytes())
        tmp_initrd = initrd.with_suffix(".tmp")
        tmp_initrd.write_bytes(gzip.compress(cpio.close(), compresslevel=6))
        os.replace(tmp_initrd, initrd)
        shutil.copyfile(vmlinuz[-1], kernel)
    stamp.write_text(want)
    return kernel, initrd


if __name__ == "__main__":
    print(*ensure_guest())
