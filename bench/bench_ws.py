"""WebSocket benchmark: our client against our server on loopback, one connection.

    python bench/bench_ws.py [--quick]

  round trip   100-byte text message sent and echoed back, microseconds each
  1 MB echo    1,000,000-byte binary message sent and echoed back, MB/s of messages
  1 MB one way 1,000,000-byte binary messages sent back to back; the server answers once
               at the end, MB/s

Compression is off on both sides (the frames' own costs are measured; see
bench_ws_deflate.py for what permessage-deflate costs).  When the `websockets` package is
installed (with its C speed-ups), its synchronous server and client are measured the same
way for comparison; otherwise that row is skipped.  Each figure is the best of three runs.
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import mconnector  # noqa: E402

MB = 1000000


def handle(message, count=[0]):
    """The echo both servers run: a binary message whose first byte is 1 is only counted
    (one-way mode), 'count' answers how many of those arrived, anything else comes back."""
    if isinstance(message, bytes) and message[:1] == b'\x01':
        count[0] += 1
        return None
    if message == 'count':
        n, count[0] = count[0], 0
        return str(n)
    return message


def measure(send, recv, quick):
    """Return (us per 100-byte round trip, MB/s echoed, MB/s one way), best of three."""
    small = 'x' * 100
    echo_big = b'\x00' + os.urandom(MB - 1)
    one_way_big = b'\x01' + echo_big[1:]
    rounds, bigs = (2000, 20) if quick else (10000, 100)
    for _ in range(200):
        send(small)
        recv()
    best = [float('inf')] * 3
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(rounds):
            send(small)
            recv()
        best[0] = min(best[0], (time.perf_counter() - t) / rounds * 1e6)
        t = time.perf_counter()
        for _ in range(bigs):
            send(echo_big)
            recv()
        best[1] = min(best[1], (time.perf_counter() - t) / bigs)
        t = time.perf_counter()
        for _ in range(bigs):
            send(one_way_big)
        send('count')
        assert recv() == str(bigs)
        best[2] = min(best[2], (time.perf_counter() - t) / bigs)
    return best[0], 1 / best[1], 1 / best[2]


def bench_ours(quick):
    sk = mconnector.SocketServer('bench', max_size=2 * MB, compression=None)
    sk.add_route('/echo', handle)
    sk.run(port=0)
    try:
        with mconnector.SocketClient('127.0.0.1:%d' % sk.port, '/echo', max_size=2 * MB,
                                     compression=None) as c:
            return measure(c.send, c.recv, quick)
    finally:
        sk.stop()


def bench_websockets(quick):
    try:
        from websockets.sync.client import connect
        from websockets.sync.server import serve
    except ImportError:
        return None

    def handler(ws):
        for message in ws:
            reply = handle(message)
            if reply is not None:
                ws.send(reply)

    server = serve(handler, '127.0.0.1', 0, compression=None, max_size=2 * MB)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.socket.getsockname()[1]
        with connect('ws://127.0.0.1:%d/' % port, compression=None, max_size=2 * MB) as c:
            return measure(c.send, c.recv, quick)
    finally:
        server.shutdown()


def main():
    quick = '--quick' in sys.argv
    print('websocket, one connection on loopback, Python %s' % sys.version.split()[0])
    print('%-28s %14s %15s %16s' % ('', 'round trip us', '1 MB echo MB/s', '1 MB 1-way MB/s'))
    rows = [('mconnector', bench_ours(quick))]
    theirs = bench_websockets(quick)
    if theirs is None:
        print('(websockets not installed: its row is skipped)')
    else:
        import websockets
        rows.append(('websockets %s (sync)' % websockets.__version__, theirs))
    for name, (rt, echo, one_way) in rows:
        print('%-28s %14.1f %15.0f %16.0f' % (name, rt, echo, one_way))


if __name__ == '__main__':
    main()
