"""The README stays true to the code: its opening commands and every config key."""
from pathlib import Path

from fmnist_dist.config import SCHEMA

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_opens_with_the_two_commands():
    opening = "\n".join(README.splitlines()[:20])
    assert "make train" in opening and "make test" in opening


def test_every_config_key_is_documented():
    missing = [key for key in SCHEMA if f"`{key}`" not in README]
    assert not missing, f"README lacks config keys: {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
