"""A websocket echo server: every text or binary message comes back as it was sent.

    python examples/ws_echo.py [PORT]          # default 9001, on 127.0.0.1

It is the server the Autobahn|Testsuite runs against (the suite sends messages of up to
16 MiB, so the message size limit is raised from its 1 MiB default).  tools/autobahn.sh
installs the suite, starts this server on a free port and runs the suite against it:

    tools/autobahn.sh                       # or, against this server already running:
    tools/autobahn.sh ws://127.0.0.1:9001
"""

import logging
import sys

import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import SocketServer

sk = SocketServer(__name__, max_size=32 * 2 ** 20)


@sk.router('/<path:path>')
def echo(message, path):
    return message


@sk.router('/')
def echo_root(message):
    return message


def main():
    logging.basicConfig(level=logging.WARNING)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9001
    print('echo server on ws://127.0.0.1:%d (Ctrl+C stops it)' % port, flush=True)
    sk.serve_forever('127.0.0.1', port)


if __name__ == '__main__':
    main()
