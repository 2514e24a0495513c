"""WebSocket benchmark: one connection on loopback, the server in a process of its own.

    python bench/bench_ws.py [--quick]

  round trip   100-byte text message sent and echoed back, microseconds each
  1 MB echo    1,000,000-byte binary message sent and echoed back, MB/s of messages
  1 MB one way 1,000,000-byte binary messages sent back to back (60 a round); the server
               answers once at the end of the round, MB/s

The server runs in its own process, as a user's does.  In one process a client and a server
take turns on one GIL, and mconnector masks and unmasks in Python (where the websockets
package has C): there a one-way stream costs the sum of both sides' CPU time, where two
processes on two free cores take the larger of the two.  The row "mconnector, one process"
keeps that setup for comparison (on a machine whose cores are busy with other work the two
setups come out alike: then both sides take turns anyway).

Compression is off on both sides: the frames' own costs are measured (bench_ws_deflate.py
measures what permessage-deflate costs).  When the `websockets` package is installed (with
its C speed-ups), its synchronous server and client are measured the same way, and each
client against the other server, which tells which side limits a figure; otherwise those
rows are skipped.  Each figure is the best of three rounds.
"""

import logging
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

import mconnector  # noqa: E402

logging.getLogger('mconnector').setLevel(logging.WARNING)   # no INFO lines in the table

MB = 1000000

HANDLE = r'''
def handle(message, count=[0]):
    """The echo every server runs: a binary message whose first byte is 1 is only counted
    (one-way mode), 'count' answers how many of those arrived, anything else comes back."""
    if isinstance(message, bytes) and message[:1] == b'\x01':
        count[0] += 1
        return None
    if message == 'count':
        n, count[0] = count[0], 0
        return str(n)
    return message
'''
exec(HANDLE)

SERVERS = {
    'mconnector': HANDLE + r'''
import logging, sys, mconnector
logging.getLogger('mconnector').setLevel(logging.WARNING)   # no INFO lines in the table
sk = mconnector.SocketServer('bench', max_size=2000000, compression=None)
sk.add_route('/echo', handle)
sk.run(port=0)
print(sk.port, flush=True)
sys.stdin.read()
sk.stop()
''',
    'websockets': HANDLE + r'''
import sys, threading
from websockets.sync.server import serve
def handler(ws):
    for message in ws:
        reply = handle(message)
        if reply is not None:
            ws.send(reply)
server = serve(handler, '127.0.0.1', 0, compression=None, max_size=2000000)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.socket.getsockname()[1], flush=True)
sys.stdin.read()
''',
}


def start_server(kind):
    proc = subprocess.Popen([sys.executable, '-c', SERVERS[kind]], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    return proc, int(proc.stdout.readline())


def client(kind, port):
    """A client of that kind for the server on `port`, as a context manager."""
    if kind == 'mconnector':
        return mconnector.SocketClient('127.0.0.1:%d' % port, '/echo', max_size=2 * MB,
                                       compression=None)
    from websockets.sync.client import connect
    return connect('ws://127.0.0.1:%d/echo' % port, compression=None, max_size=2 * MB)


def measure(send, recv, quick):
    """Return (us per 100-byte round trip, MB/s echoed, MB/s one way), best of three."""
    small = 'x' * 100
    echo_big = b'\x00' + os.urandom(MB - 1)
    one_way_big = b'\x01' + echo_big[1:]
    rounds, echoes, one_way = (2000, 10, 20) if quick else (10000, 30, 60)
    for _ in range(200):
        send(small)
        recv()
    send(echo_big)
    recv()
    best = [float('inf')] * 3
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(rounds):
            send(small)
            recv()
        best[0] = min(best[0], (time.perf_counter() - t) / rounds * 1e6)
        t = time.perf_counter()
        for _ in range(echoes):
            send(echo_big)
            recv()
        best[1] = min(best[1], (time.perf_counter() - t) / echoes)
        t = time.perf_counter()
        for _ in range(one_way):
            send(one_way_big)
        send('count')
        assert recv() == str(one_way)
        best[2] = min(best[2], (time.perf_counter() - t) / one_way)
    return best[0], 1 / best[1], 1 / best[2]


def in_one_process(quick):
    """mconnector's client and server in this one process (the setup to avoid)."""
    sk = mconnector.SocketServer('bench', max_size=2 * MB, compression=None)
    sk.add_route('/echo', handle)
    sk.run(port=0)
    try:
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo', max_size=2 * MB,
                                       compression=None) as c:
            return measure(c.send, c.recv, quick)
    finally:
        sk.stop()


def main():
    quick = '--quick' in sys.argv
    try:
        import websockets
        kinds = ['mconnector', 'websockets']
        version = websockets.__version__
    except ImportError:
        kinds = ['mconnector']
        version = None
    print('websocket, one connection on loopback, Python %s' % sys.version.split()[0])
    print('%-42s %14s %15s %16s' % ('client -> server (own process)', 'round trip us',
                                    '1 MB echo MB/s', '1 MB 1-way MB/s'))
    servers = {kind: start_server(kind) for kind in kinds}
    rows = []
    try:
        for server in kinds:
            for kind in kinds:
                with client(kind, servers[server][1]) as c:
                    rows.append(('%s -> %s' % (kind, server), measure(c.send, c.recv, quick)))
        rows.append(('mconnector, one process (not a user\'s setup)', in_one_process(quick)))
    finally:
        for proc, _ in servers.values():
            proc.stdin.close()
            proc.wait(10)
    for name, (rt, echo, one_way) in rows:
        if version:
            name = name.replace('websockets', 'websockets ' + version)
        print('%-42s %14.1f %15.0f %16.0f' % (name, rt, echo, one_way))
    if version is None:
        print('(websockets not installed: its rows are skipped)')


if __name__ == '__main__':
    main()
