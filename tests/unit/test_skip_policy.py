"""The suite's skip policy (tests/conftest.py): a missing prerequisite skips on a laptop and FAILS
under VRA_REQUIRE_KVM=1, and no test gives up any other way.

The dynamic checks run real pytest in a subprocess with a PATH that hides the tools, so what is
proved is what CI would see, not what the helper says about itself.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

# Calls that give a test up without going through conftest.missing()/opt_in().
FORBIDDEN = {"skip", "skipif", "importorskip", "xfail"}


def _pytest(args: list[str], tmp_path: Path, strict: bool, cwd: Path = ROOT,
            pythonpath: str | None = None) -> subprocess.CompletedProcess:
    empty_bin = tmp_path / "empty-bin"  # PATH without openssl, qemu-system-x86_64, promtool...
    empty_bin.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "VRA_REQUIRE_KVM"}
    env["PATH"] = str(empty_bin)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    if strict:
        env["VRA_REQUIRE_KVM"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _summary(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no pytest output:\n{proc.stderr}"
    return lines[-1]


def test_missing_openssl_skips_on_a_laptop_and_fails_on_ci(tmp_path):
    test = "tests/unit/test_server.py::test_tls"
    laptop = _pytest([test], tmp_path, strict=False)
    assert laptop.returncode == 0 and "1 skipped" in _summary(laptop), laptop.stdout
    assert "openssl is not installed" in laptop.stdout
    ci = _pytest([test], tmp_path, strict=True)
    assert ci.returncode == 1 and "1 failed" in _summary(ci), ci.stdout
    assert "VRA_REQUIRE_KVM=1 forbids skipping: openssl is not installed" in ci.stdout


def test_kvm_and_bpf_markers_require_their_prerequisites(tmp_path):
    """A test marked `kvm` (or `bpf`) with no fixture of its own: the conftest hook makes it
    require QEMU/KVM, here hidden by the PATH."""
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.kvm\ndef test_kvm():\n    pass\n\n"
        "@pytest.mark.bpf\ndef test_bpf():\n    pass\n\n"
        "def test_plain():\n    pass\n")
    # tests/conftest.py loaded as a plugin into a run outside the tree
    args = ["-p", "conftest", "--rootdir", str(tmp_path), "test_marked.py"]
    path = f"{TESTS}{os.pathsep}{ROOT}"
    laptop = _pytest(args, tmp_path, strict=False, cwd=tmp_path, pythonpath=path)
    ci = _pytest(args, tmp_path, strict=True, cwd=tmp_path, pythonpath=path)
    assert "1 passed, 2 skipped" in _summary(laptop), laptop.stdout + laptop.stderr
    assert "qemu-system-x86_64 is not installed" in laptop.stdout, laptop.stdout
    # failing in set-up (as the kvm/bpf fixtures do) is a pytest "error": the run fails
    assert ci.returncode == 1 and "1 passed" in _summary(ci) and "2 errors" in _summary(ci), \
        ci.stdout + ci.stderr
    assert ci.stdout.count("VRA_REQUIRE_KVM=1 forbids skipping: qemu-system-x86_64") == 2


def _forbidden_calls(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every pytest.skip / importorskip / xfail / mark.skip(if) use."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN:
            names = [node.attr]
            base = node.value
            while isinstance(base, ast.Attribute):
                names.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == "pytest":
                found.append((node.lineno, ".".join(["pytest", *reversed(names)])))
    return sorted(found)


def test_no_test_skips_except_through_conftest():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name}"
                 for path in sorted(TESTS.rglob("*.py")) if path != TESTS / "conftest.py"
                 for line, name in _forbidden_calls(path)]
    assert offenders == [], ("skip through conftest.missing() / require_*() / opt_in() so that "
                             "VRA_REQUIRE_KVM=1 turns it into a failure:\n" + "\n".join(offenders))


def test_the_static_check_sees_each_way_of_skipping(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import pytest\n"
                      "pytestmark = pytest.mark.skipif(True, reason='x')\n"
                      "yaml = pytest.importorskip('yaml')\n"
                      "def test_a():\n    pytest.skip('x')\n"
                      "@pytest.mark.xfail\ndef test_b():\n    pass\n")
    assert _forbidden_calls(sample) == [(2, "pytest.mark.skipif"), (3, "pytest.importorskip"),
                                        (5, "pytest.skip"), (6, "pytest.mark.xfail")]
