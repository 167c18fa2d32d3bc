"""The benchmarks run as scripts, outside the tests: importing each one here catches a name that
lm/ or launcher/ renamed under them (int8_kernels.py once imported a function that no longer existed)."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports_and_has_a_main(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: `from report import ...`
    module = importlib.import_module(script)
    assert script == "report" or callable(module.main)
