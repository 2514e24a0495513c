"""Tests for mconnector: real listeners on loopback (port 0), real senders, real bytes.

Run with:  python -m unittest -v test_mconnector
"""

import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
import unittest

import mconnector


HERE = os.path.dirname(os.path.abspath(__file__))


def wait_for(predicate, timeout=5.0, interval=0.005):
    """Poll `predicate` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ==========================================================================================
# Routing
# ==========================================================================================


class RuleTest(unittest.TestCase):
    def test_sanic_and_flask_styles(self):
        r = mconnector.Rule('/item/<id:int>/<int:x>/<name>/<p:path>')
        self.assertEqual(r.match('/item/3/-4/bob/a/b'), {'id': 3, 'x': -4, 'name': 'bob', 'p': 'a/b'})
        self.assertIsNone(r.match('/item/x/4/bob/a'))

    def test_typed_parameters(self):
        self.assertEqual(mconnector.Rule('/n/<v:number>').match('/n/2.5'), {'v': 2.5})
        self.assertIsNone(mconnector.Rule('/a/<v:alpha>').match('/a/ab1'))
        u = '12345678-1234-1234-1234-123456789abc'
        import uuid
        self.assertEqual(mconnector.Rule('/u/<v:uuid>').match('/u/' + u), {'v': uuid.UUID(u)})
        self.assertEqual(mconnector.Rule('/r/<c:[a-z]{3}>').match('/r/abc'), {'c': 'abc'})
        self.assertIsNone(mconnector.Rule('/r/<c:[a-z]{3}>').match('/r/abcd'))

    def test_bad_rules(self):
        for bad in ('nope', '/x/<1a>', '/x/<a>/<a>', '/x/<a:(b)>', '/x/<a:[>'):
            with self.assertRaises(mconnector.RouteError, msg=bad):
                mconnector.Rule(bad)


# ==========================================================================================
# Values, HTTP, listener, sender, command line (issue 2)
# ==========================================================================================

# (core tests)


# ==========================================================================================
# WebSocket (issue 4)
# ==========================================================================================

# (websocket tests)


# ==========================================================================================
# Pools (issue 3)
# ==========================================================================================

# (pool tests)


if __name__ == '__main__':
    unittest.main()
