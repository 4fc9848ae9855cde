"""The CLI starts without torch or transformers: `alignkit --help`, every subcommand's help,
`alignkit train METHOD --help` (every method: its config class lives in a torch-free module,
``Method.config_module``) and a config error answer without importing them. Importing them made
every command take 5-9 s to start; now these answer in about half a second of CPU time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.trainers.registry import METHODS

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "accelerate", "peft", "datasets")

#: Runs `main(argv)` in a fresh interpreter and prints which heavy modules it imported.
PROBE = """
import json, sys
from alignkit.cli import main
argv = json.loads(sys.argv[1])
try:
    main(argv)
except SystemExit as done:
    code = done.code
else:
    code = 0
heavy = json.loads(sys.argv[2])
print("\\nPROBE", json.dumps({"code": code, "imported": [m for m in heavy if m in sys.modules]}))
"""


def probe(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(argv)), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, out.stderr[-2000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


def test_importing_the_cli_and_registering_every_command_imports_no_heavy_module():
    code = (
        "import sys, alignkit.cli as cli; cli._register_commands(); "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        *(("train", method, "--help") for method in METHODS),
        ("eval", "--help"),
        ("generate", "--help"),
        ("recommend", "--help"),
        ("pipeline", "--help"),
        ("ops-check", "--help"),
    ],
    ids=" ".join,
)
def test_help_answers_without_torch(argv):
    result = probe(*argv)
    assert result == {"code": 0, "imported": []}


def test_a_config_error_answers_without_torch():
    result = probe("train", "grpo", "-c", "examples/grpo.yaml", "epsilon=0.2")
    assert result == {"code": 2, "imported": []}
    # also a wrong value type deep in the file, found before any section is constructed
    result = probe("train", "grpo", "-c", "examples/grpo.yaml", "optim.lr=fast")
    assert result == {"code": 2, "imported": []}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_methods_config_error_answers_without_torch(method):
    assert METHODS[method].config_module is not None
    result = probe("train", method, "no_such_key=1")
    assert result == {"code": 2, "imported": []}
