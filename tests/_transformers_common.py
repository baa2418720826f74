"""transformers' own common test mixins, imported unmodified from the tests/ folder of the installed version's sdist.

``scripts/install.sh`` downloads ``transformers-<version>.tar.gz`` (the version the venv resolved, which
pyproject.toml pins) into the archive cache; the first use extracts its tests/ folder beside it, once. The folder is
imported as the package ``transformers_common_tests`` whose path also holds ``tests/transformers_standins`` (the
few modules the sdist lacks; see the README there).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
STANDINS = Path(__file__).parent / "transformers_standins"


def archives_dir() -> Path:
    """The archive cache of scripts/install.sh: ``ESP_MEDSAM_ARCHIVES`` or ``~/.cache/esp-medsam/archives``."""
    return Path(os.environ.get("ESP_MEDSAM_ARCHIVES") or Path.home() / ".cache" / "esp-medsam" / "archives")


def sdist_tests_dir() -> Path:
    """The extracted tests/ folder of the installed transformers' sdist (extracted on first use, atomically)."""
    version = transformers.__version__
    target = archives_dir() / f"transformers-{version}-tests"
    if target.is_dir():
        return target / "tests"
    sdist = archives_dir() / f"transformers-{version}.tar.gz"
    if not sdist.is_file():
        raise FileNotFoundError(
            f"{sdist} is missing: transformers' common tests come from the sdist of the installed version "
            f"{version}; run `bash scripts/install.sh` to fetch it."
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=archives_dir()))
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for member in members:
            member.name = "tests/" + member.name[len(prefix):]
        archive.extractall(staging, members=members, filter="data")
    # The repository's tests/__init__.py (empty) is not in the sdist; test_configuration_common.py executes it.
    (staging / "tests" / "__init__.py").touch()
    try:
        staging.rename(target)
    except OSError:  # another process extracted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target / "tests"


def common_module(name: str) -> types.ModuleType:
    """``transformers_common_tests.<name>``, e.g. ``common_module("test_modeling_common").ModelTesterMixin``."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(sdist_tests_dir()), str(STANDINS)]
        sys.modules[PACKAGE] = package
        sys.path.append(str(STANDINS / "ci_utils"))
    return importlib.import_module(f"{PACKAGE}.{name}")
