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
    bounds = {**requirements("requirements.txt", ">="), **requirements("requirements-dev.txt", ">=")}
    pins = requirements("requirements-lowest.txt", "==")
    wanted = {k: v for k, v in bounds.items() if k not in ("torch", "nbclient", "nbformat", "ipykernel")}
    assert {k: pins.get(k) and Version(pins[k]) for k in wanted} == {k: Version(v) for k, v in wanted.items()}
