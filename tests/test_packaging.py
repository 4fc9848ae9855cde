"""The package metadata builds without setuptools' deprecation warnings (the install printed
"`project.license` as a TOML table is deprecated" three times) and declares its licence as an
SPDX expression."""

from __future__ import annotations

import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import sys, warnings
from setuptools import build_meta
warnings.simplefilter("always")
print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))
"""


def test_metadata_builds_without_deprecation_warnings_and_with_an_spdx_licence(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)  # the metadata needs no package files
    (tmp_path / "meta").mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    out = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path / "meta")],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Deprecat" not in out.stderr, out.stderr
    info = out.stdout.strip().splitlines()[-1]
    metadata = Parser().parsestr((tmp_path / "meta" / info / "METADATA").read_text())
    assert metadata["License-Expression"] == "Apache-2.0"


def test_no_test_directory_shadows_an_installed_package():
    """pytest puts the directory of each rootless test module on ``sys.path``, so a test folder
    named like an installed package (``tests/rollout/vllm`` once) becomes a namespace package
    that ``find_spec`` reports as installed: TRL then parsed its version 'N/A' and failed to
    import (CI, 2026-12)."""
    import importlib.metadata

    # Installed packages, and optional ones that TRL, transformers or accelerate probe for.
    probed = {"vllm", "sglang", "deepspeed", "flash_attn", "liger_kernel", "bitsandbytes", "wandb"}
    installed = set(importlib.metadata.packages_distributions()) | probed
    tests = Path(__file__).parent
    folders = {p.name for p in tests.rglob("*") if p.is_dir() and not p.name.startswith((".", "_"))}
    shadowing = sorted(folders & installed)
    assert not shadowing, f"test folders named like installed packages: {shadowing}"
