"""Fixtures shared by the trainer tests: a tiny random Llama (and a second one with other weights) and a small
learnable preference set, built once per test module in a temporary folder (tests/tiny.py)."""
import pytest

from tiny import make_model_dir, make_preference_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {"model": make_model_dir(base / "model"), "dataset": make_preference_dir(base / "data"),
            "other_model": make_model_dir(base / "other", seed=1), "base": base}
