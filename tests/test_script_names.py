"""Scripts run as `python benchmarks/x.py` or `python examples/x.py` put their folder first on
sys.path, so a script named like a package that transformers (or torch) imports shadows it:
benchmarks/kernels.py once broke every benchmark on transformers 5.25, which imports `kernels`."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("benchmarks", "examples") for p in (REPO / folder).glob("*.py"))


def _optional_imports() -> set[str]:
    """Every package transformers checks for (and imports when present), read from its source."""
    import transformers.utils.import_utils as iu

    text = Path(iu.__file__).read_text()
    return set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_.]+)"', text))


def _importable_elsewhere(name: str, folder: Path) -> bool:
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != folder.resolve()]
    try:
        return importlib.util.find_spec(name) is not None
    finally:
        sys.path[:] = saved


def test_the_optional_import_list_is_read():
    assert {"accelerate", "kernels"} <= _optional_imports()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_script_shadows_a_package(script: Path):
    name = script.stem
    assert name not in _optional_imports(), f"{script} shadows {name!r}, which transformers imports when present"
    assert name not in sys.stdlib_module_names
    assert not _importable_elsewhere(name, script.parent), f"{script} shadows the installed module {name!r}"
