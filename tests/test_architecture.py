"""
What the package's layout promises, checked on its source: Twisted's private names are used
only in vast_vespa/net/, every one used there is checked at start-up by the guard, and no test
double (Twisted's testing module) is used by the package itself.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import vast_vespa
from vast_vespa.net import guard

PACKAGE = os.path.dirname(os.path.abspath(vast_vespa.__file__))


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    trees[os.path.relpath(path, PACKAGE)] = ast.parse(f.read(), path)
    return trees


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every private name Vespa defines itself: functions, classes, attributes its classes set
    on themselves (``self._x = ...``: one set on another object, ``headers._rawHeaders = ...``,
    may be Twisted's), variables, parameters."""
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
    return {name for name in own if _private(name)}


def _twisted_private_uses(tree: ast.Module, own: set[str]) -> set[str]:
    """Private names of Twisted's a module uses: imported from twisted, read as attributes
    (or through getattr) when Vespa does not define them, and private twisted modules."""
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            used.update(part for part in (node.module or "").split(".") if _private(part))
            used.update(alias.name for alias in node.names if _private(alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("twisted"):
                    used.update(part for part in alias.name.split(".") if _private(part))
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            used.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and node.args[1].value not in own
        ):
            used.add(node.args[1].value)
    return used


# Twisted's test doubles (StringTransport, MemoryReactor, ...): for tests, not for the package.
TEST_DOUBLES = ("twisted.internet.testing", "twisted.test.proto_helpers")


def _imports(tree: ast.Module) -> set[str]:
    """The modules a module imports, at any depth (a function's own imports too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


class ArchitectureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.trees = _modules()
        self.own = _own_names(self.trees)

    def test_private_twisted_names_only_in_net(self) -> None:
        """Outside vast_vespa/net/, Vespa uses Twisted's public API only."""
        outside = {
            path: sorted(_twisted_private_uses(tree, self.own))
            for path, tree in self.trees.items()
            if not path.startswith("net" + os.sep)
        }
        self.assertEqual({path: names for path, names in outside.items() if names}, {})

    def test_every_private_name_in_net_is_guarded(self) -> None:
        """Each private Twisted name a net/ module uses is checked by the guard at start-up
        (or is the class a checked name belongs to)."""
        guarded = {need.name for need in guard.NEEDS}
        guarded |= {need.owner.rpartition(":")[2].removesuffix("()") for need in guard.NEEDS}
        guarded |= {need.owner.rpartition(".")[2] for need in guard.NEEDS}
        unguarded = {
            path: sorted(_twisted_private_uses(tree, self.own) - guarded)
            for path, tree in self.trees.items()
            if path.startswith("net" + os.sep)
        }
        self.assertEqual({path: names for path, names in unguarded.items() if names}, {})

    def test_no_test_double_in_the_package(self) -> None:
        """No module of the package imports Twisted's test doubles, not even to probe."""
        using = {
            path: sorted(_imports(tree) & set(TEST_DOUBLES)) for path, tree in self.trees.items()
        }
        self.assertEqual({path: names for path, names in using.items() if names}, {})

    def test_imports_are_seen_inside_functions(self) -> None:
        """The scan sees an import made inside a function (as a probe would make it)."""
        source = "def probe():\n    from twisted.internet.testing import StringTransport\n"
        self.assertIn("twisted.internet.testing", _imports(ast.parse(source)))

    def test_a_private_attribute_set_on_another_object_is_not_own(self) -> None:
        """Setting one of Twisted's private attributes (``headers._rawHeaders = ...``) does not
        make it Vespa's own name: only what a class sets on itself is."""
        tree = ast.parse("self._mine = 1\nheaders._rawHeaders = {}\n")
        self.assertEqual(_own_names({"m.py": tree}), {"_mine"})

    def test_the_check_finds_a_private_name(self) -> None:
        """The scan itself sees the forms of use it looks for."""
        source = (
            "from twisted.internet._sslverify import X\n"
            "from twisted.web.http import _ChunkedTransferDecoder\n"
            "pool._factory = None\n"
            "getattr(protocol, '_wrappedProtocol', None)\n"
            "self._mine = 1\n"
            "self._mine\n"
        )
        used = _twisted_private_uses(ast.parse(source), {"_mine"})
        self.assertEqual(
            used, {"_sslverify", "_ChunkedTransferDecoder", "_factory", "_wrappedProtocol"}
        )
