"""Fresh request ids: 32 hex digits, never repeated within a process or across processes."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from vast_vespa import request_id


class FreshIdTests(SynchronousTestCase):
    def test_unique_hex(self) -> None:
        """Many fresh ids in a row are all different and look like the uuid4 hex they replace."""
        ids = [request_id._fresh.next() for _ in range(10_000)]
        self.assertEqual(len(set(ids)), len(ids))
        for rid in ids[:3] + ids[-3:]:
            self.assertRegex(rid.decode(), r"^[0-9a-f]{32}$")

    def test_new_prefix_after_reseed(self) -> None:
        """A process that starts over (a restart, a forked child) does not reuse ids: its
        counter starts again but under another random prefix."""
        fresh = request_id._Fresh()
        before = {fresh.next() for _ in range(100)}
        fresh.reseed()
        after = {fresh.next() for _ in range(100)}
        self.assertEqual(before & after, set())

    def test_forked_child_has_own_ids(self) -> None:
        """A child forked after ids were made (twistd daemonising) makes different ones."""
        request_id._fresh.next()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its next id and leave without running trial's exit
            os.write(write, request_id._fresh.next())
            os._exit(0)
        os.close(write)
        child = os.read(read, 64)
        os.close(read)
        os.waitpid(pid, 0)
        mine = request_id._fresh.next()
        self.assertRegex(child.decode(), r"^[0-9a-f]{32}$")
        self.assertNotEqual(child[:16], mine[:16])  # the random prefixes
