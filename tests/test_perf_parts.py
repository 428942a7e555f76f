"""perf/parts.py: each part's prelude still replaces something that exists (a renamed name
would make ``--parts`` measure the whole fast path under a part's name), and the header
table's turns the header table off where the request path takes it from."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
sys.path.insert(0, PERF)
from parts import PRELUDES  # noqa: E402  # perf/ holds scripts, not a package

# Run in a child: the preludes patch live modules. Each statement runs in turn; before an
# assignment to an attribute, the attribute must already be there.
CHECK_EVERY_PART = """
import ast, sys
sys.path.insert(0, {perf!r})
from parts import PRELUDES
for part, code in PRELUDES.items():
    namespace = {{}}
    for statement in ast.parse(code).body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Attribute):
                    owner = eval(compile(ast.Expression(target.value), part, "eval"), namespace)
                    if not hasattr(owner, target.attr):
                        print(part, "replaces", ast.unparse(target), "which is not there")
        exec(compile(ast.Module([statement], []), part, "exec"), namespace)
print("checked", len(PRELUDES))
"""

HEADER_TABLE_OFF = """
{prelude}
from vast_vespa.headers import PUBLIC_HEADER_OPS
from vast_vespa.net import client, request
from vast_vespa.site import VespaSite
from twisted.web.resource import Resource
site = VespaSite(Resource(), fast_path=True)
print(request.LeanRequest.header_ops is PUBLIC_HEADER_OPS, client.RAW_HEADER_OPS is PUBLIC_HEADER_OPS,
      site.header_ops is PUBLIC_HEADER_OPS)
"""


def run(source: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode:
        raise AssertionError(done.stderr)
    return done.stdout


class PartsTests(SynchronousTestCase):
    def test_every_part_replaces_what_is_there(self) -> None:
        self.assertEqual(run(CHECK_EVERY_PART.format(perf=PERF)), f"checked {len(PRELUDES)}\n")

    def test_header_table_part_turns_it_off(self) -> None:
        """The worker's Request, its channels and its backend client all get the public
        HeaderOps."""
        out = run(HEADER_TABLE_OFF.format(prelude=PRELUDES["header-table"]))
        self.assertEqual(out, "True True True\n")
