"""The floor env tests what setup.cfg declares: constraints/floor.txt pins each floor."""

from __future__ import annotations

import configparser
import os
import re
from importlib.metadata import version

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR_FILE = os.path.join(ROOT, "constraints", "floor.txt")
FLOOR_EXTRAS = ("test", "aiohttp")  # what the test envs install besides install_requires
_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*>=\s*(\S+)")


def _name(text: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", text).lower()


def declared_floors() -> dict[str, str]:
    """Each dependency in setup.cfg (install_requires and FLOOR_EXTRAS) and its floor."""
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    lines = config["options"]["install_requires"].splitlines()
    for extra in FLOOR_EXTRAS:
        lines += config["options.extras_require"][extra].splitlines()
    floors = {}
    for line in filter(None, (line.strip() for line in lines)):
        found = _REQUIREMENT.fullmatch(line)
        assert found, f"setup.cfg: {line!r} is not 'name >= version'"
        floors[_name(found.group(1))] = found.group(2)
    return floors


def pinned_floors() -> dict[str, str]:
    """Each pin of constraints/floor.txt."""
    pins = {}
    with open(FLOOR_FILE, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[_name(name)] = version
    return pins


class FloorTests(SynchronousTestCase):
    def test_floor_constraints_are_the_declared_floors(self) -> None:
        """Every dependency the floor env installs is pinned at the version setup.cfg names as
        its minimum, and nothing else is pinned: the two cannot drift apart."""
        self.assertEqual(pinned_floors(), declared_floors())

    def test_the_floors_are_read(self) -> None:
        """The parse finds install_requires and the extras (equal empty dicts would pass)."""
        floors = declared_floors()
        self.assertIn("twisted", floors)
        self.assertIn("hypothesis", floors)

    def test_the_floor_env_runs_at_the_floors(self) -> None:
        """In tox -e floor (UV_CONSTRAINT and PIP_CONSTRAINT name the floor file), every
        dependency is installed at its floor: the env tests what it says it tests."""
        constraints = {os.environ.get("UV_CONSTRAINT"), os.environ.get("PIP_CONSTRAINT")}
        if FLOOR_FILE not in constraints:
            raise SkipTest("not the floor env (tox -e floor)")
        # uv makes the env (tox-uv), pip runs the installs of the tests (start_server.sh).
        self.assertEqual(constraints, {FLOOR_FILE})
        installed = {name: version(name) for name in pinned_floors()}
        self.assertEqual(installed, pinned_floors())
