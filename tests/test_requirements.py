"""requirements-lowest.txt pins exactly the lower bounds of requirements.txt (torch aside: the CI installs the CPU
build 2.13 first) and pytest's of requirements-dev.txt, so the lower-bound run in .ci/run tests the bounds we state."""
import re
from pathlib import Path

from packaging.version import Version  # (pytest depends on packaging)

ROOT = Path(__file__).resolve().parents[1]


def requirements(name, operator):
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    found = [re.fullmatch(rf"([A-Za-z0-9_.-]+){re.escape(operator)}([0-9][0-9.]*)", line) for line in lines if line]
    return {m[1].lower(): m[2] for m in found if m}


def test_lowest_pins_are_the_stated_bounds():
    """The runtime bounds (torch aside) and pytest's; the other development tools are not in the lower-bound run."""
    bounds = {**requirements("requirements.txt", ">="), "pytest": requirements("requirements-dev.txt", ">=")["pytest"]}
    pins = requirements("requirements-lowest.txt", "==")
    wanted = {k: v for k, v in bounds.items() if k != "torch"}
    assert {k: pins.get(k) and Version(pins[k]) for k in wanted} == {k: Version(v) for k, v in wanted.items()}
