"""Broadcast benchmark: one message to thousands of websocket connections on loopback.

    python bench/bench_broadcast.py [--quick]

  idle memory     the server process's resident memory for 5,000 idle connections, per
                  connection (KiB)
  call            SocketServer.broadcast() of a 1,000-byte text message to the 5,000: the
                  time the call takes (ms)
  all received    from the call until the last of the 5,000 has the whole message (ms)
  during          resident memory the broadcast adds, at most, while it is delivered (MiB)
  slow reader     1,000 connections, one of which reads nothing (a 4 KiB receive buffer)
                  and is behind already: the others' delivery time with that one left out
                  of the targets and with it among them (ms)
  deflate         the same with permessage-deflate negotiated: the clients offer it as
                  browsers do.  Broadcast frames go uncompressed in mconnector (RFC 7692
                  lets any message be), compressed for each connection in websockets

Each scenario runs in a process of its own (the server), with the clients in another (raw
sockets in one selector loop: they cost the server's process nothing).  When the
`websockets` package can be imported (run this with a Python that has it), its asyncio
server and broadcast() run the same scenarios (keep-alive pings off on both).  Figures are medians of the runs; only the ratios within one run mean much on a
shared machine.
"""

import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))

IDLE = 5000
AMONG = 1000
SIZE = 1000
HANDSHAKE = (b'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n'
             b'Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'
             b'Sec-WebSocket-Version: 13\r\n%s\r\n')
OFFER = b'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n'


def raise_fd_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss():
    """Resident memory of this process, bytes."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


# -- the clients' process -----------------------------------------------------------------------

def clients(port, count, slow, compress):
    """Open `count` connections on /feed (and one on /slow that never reads), then report
    each time every /feed connection has one more whole message: 'got K TIME'."""
    raise_fd_limit(count + 100)
    socks = []
    for _ in range(count):
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(HANDSHAKE % (b'/feed', OFFER if compress else b''))
        socks.append(s)
    if slow:
        lazy = socket.socket()
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.connect(('127.0.0.1', port))
        lazy.sendall(HANDSHAKE % (b'/slow', OFFER if compress else b''))
    sel = selectors.DefaultSelector()
    state = {}
    for s in socks:
        s.setblocking(False)
        state[s] = [bytearray(), False, 0]         # buffer, past the 101, messages
        sel.register(s, selectors.EVENT_READ)
    heads = 0
    reached = {}
    print('ready', flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            entry = state[s]
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(s)
                continue
            buf = entry[0]
            buf += data
            if not entry[1]:
                end = buf.find(b'\r\n\r\n')
                if end < 0:
                    continue
                del buf[:end + 4]
                entry[1] = True
                heads += 1
                if heads == count:
                    print('open', flush=True)
            while len(buf) >= 2:
                n, pos = buf[1] & 0x7F, 2
                if n == 126:
                    if len(buf) < 4:
                        break
                    n, pos = int.from_bytes(buf[2:4], 'big'), 4
                elif n == 127:
                    if len(buf) < 10:
                        break
                    n, pos = int.from_bytes(buf[2:10], 'big'), 10
                if len(buf) < pos + n:
                    break
                del buf[:pos + n]
                entry[2] += 1
                k = entry[2]
                reached[k] = reached.get(k, 0) + 1
                if reached[k] == count:
                    print('got %d %r' % (k, time.monotonic()), flush=True)


class Clients:
    def __init__(self, port, count, slow=False, compress=False):
        self.proc = subprocess.Popen([sys.executable, __file__, '--clients', str(port),
                                      str(count), '1' if slow else '0',
                                      '1' if compress else '0'],
                                     stdout=subprocess.PIPE, text=True)
        self.expect('ready')
        self.expect('open')
        self.messages = 0

    def expect(self, word):
        line = self.proc.stdout.readline().split()
        if not line or line[0] != word:
            raise RuntimeError('the clients said %r, not %r' % (line, word))
        return line

    def delivered(self):
        """When the next message had reached every client (time.monotonic())."""
        self.messages += 1
        line = self.expect('got')
        assert int(line[1]) == self.messages, line
        return float(line[2])

    def close(self):
        self.proc.terminate()
        self.proc.wait()


# -- the servers --------------------------------------------------------------------------------

class Mconnector:
    name = 'mconnector'

    def __init__(self, compress):
        import logging
        import mconnector
        logging.getLogger('mconnector').setLevel(logging.WARNING)   # no lines in the table
        self.sk = mconnector.SocketServer('bench', ping_interval=None,
                                          compression='deflate' if compress else None)
        self.sk.router('/feed')(lambda message: None)
        self.sk.router('/slow')(lambda message: None)
        self.sk.run(port=0)
        self.port = self.sk.port

    def count(self, path=None):
        return sum(1 for ws in list(self.sk.connections) if path is None or ws.path == path)

    def broadcast(self, message, path=None):
        """(seconds the call took, monotonic time it started, connections left out)."""
        started = time.monotonic()
        sent, behind = self.sk.broadcast(message, path=path)
        return time.monotonic() - started, started, len(behind)

    def fill_slow(self):
        """Queue to /slow until it is behind."""
        big = b'x' * 65536
        for _ in range(1000):
            sent, behind = self.sk.broadcast(big, path='/slow')
            if behind:
                return True
            time.sleep(0.001)       # let the loop hand it to the kernel
        return False

    def stop(self):
        self.sk.stop()


class Websockets:
    def __init__(self, compress):
        import asyncio
        import websockets
        from websockets.asyncio.server import broadcast, serve
        self.name = 'websockets %s' % websockets.__version__
        self._broadcast = broadcast
        self.asyncio = asyncio
        self.conns = set()
        ready = threading.Event()

        async def handler(ws):
            self.conns.add(ws)
            try:
                await ws.wait_closed()
            finally:
                self.conns.discard(ws)

        async def main():
            self.loop = asyncio.get_running_loop()
            self.stopping = self.loop.create_future()
            async with serve(handler, '127.0.0.1', 0, ping_interval=None, backlog=4096,
                             compression='deflate' if compress else None) as server:
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await self.stopping

        self.thread = threading.Thread(target=asyncio.run, args=(main(),))
        self.thread.start()
        ready.wait()

    def count(self, path=None):
        return sum(1 for ws in list(self.conns) if path is None or ws.request.path == path)

    def broadcast(self, message, path=None):
        async def run():
            targets = [ws for ws in self.conns if path is None or ws.request.path == path]
            started = time.monotonic()
            self._broadcast(targets, message)
            return time.monotonic() - started, started, 0
        return self.asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def fill_slow(self):
        big = b'x' * 65536
        for _ in range(200):        # what ours leaves out, websockets queues: as much
            self.broadcast(big, path='/slow')
        return True

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopping.set_result, None)
        self.thread.join()


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError('timed out')
        time.sleep(0.01)


def scenario(kind, runs, compress):
    """In a process of its own: the figures of one server, as JSON on stdout."""
    import gc
    raise_fd_limit(IDLE + AMONG + 200)
    server = (Mconnector if kind == 'mconnector' else Websockets)(compress)
    message = 'm' * SIZE
    # Idle connections, and one message to all of them.
    gc.collect()
    before = rss()
    crowd = Clients(server.port, IDLE, compress=compress)
    wait_for(lambda: server.count('/feed') == IDLE)
    gc.collect()
    idle = rss()
    calls, deliveries, during = [], [], []
    for _ in range(runs):
        took, started, _ = server.broadcast(message)
        during.append(rss() - idle)
        deliveries.append(crowd.delivered() - started)
        during.append(rss() - idle)
        calls.append(took)
    crowd.close()
    wait_for(lambda: server.count() == 0)
    # A slow reader among AMONG connections.
    few = Clients(server.port, AMONG - 1, slow=True, compress=compress)
    wait_for(lambda: server.count('/feed') == AMONG - 1 and server.count('/slow') == 1)
    behind = server.fill_slow()
    without, among = [], []
    for _ in range(runs):
        took, started, _ = server.broadcast(message, path='/feed')
        without.append(few.delivered() - started)
        took, started, left_out = server.broadcast(message)
        among.append(few.delivered() - started)
    few.close()
    server.stop()
    print(json.dumps({
        'name': server.name + (' deflate' if compress else ''),
        'idle_kib': (idle - before) / IDLE / 1024,
        'call_ms': statistics.median(calls) * 1e3,
        'all_ms': statistics.median(deliveries) * 1e3,
        'during_mib': max(during) / 2 ** 20,
        'behind': behind,
        'without_ms': statistics.median(without) * 1e3,
        'among_ms': statistics.median(among) * 1e3,
    }))


def main():
    quick = '--quick' in sys.argv
    runs = 3 if quick else 9
    limit = raise_fd_limit(IDLE + AMONG + 200)
    if limit < IDLE + 200:
        sys.exit('needs %d file descriptors, the hard limit is %d' % (IDLE + 200, limit))
    kinds = ['mconnector']
    try:
        import websockets  # noqa: F401
        kinds.append('websockets')
    except ImportError:
        print('(websockets is not installed here: its column is skipped)')
    results = []
    for compress in ('0', '1'):
        for kind in kinds:
            out = subprocess.run([sys.executable, __file__, '--scenario', kind, str(runs),
                                  compress], stdout=subprocess.PIPE, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    rows = [
        ('idle memory per connection, KiB', 'idle_kib', '%.1f'),
        ('broadcast 1 KB to 5,000: call, ms', 'call_ms', '%.1f'),
        ('... until all have it, ms', 'all_ms', '%.1f'),
        ('... memory it adds, MiB', 'during_mib', '%.1f'),
        ('1,000 with a slow reader left out, ms', 'without_ms', '%.1f'),
        ('1,000 with the slow reader among them, ms', 'among_ms', '%.1f'),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print('Python %s, %d runs each (medians)' % (sys.version.split()[0], runs))
    print(' ' * width + ''.join('%18s' % r['name'].split(' ')[0] for r in results))
    print(' ' * width + ''.join('%18s' % ('deflate' if r['name'].endswith('deflate') else
                                          'no compression') for r in results))
    for label, key, fmt in rows:
        print(label.ljust(width) + ''.join('%18s' % (fmt % r[key]) for r in results))


if __name__ == '__main__':
    if sys.argv[1:2] == ['--clients']:
        clients(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == '1', sys.argv[5] == '1')
    elif sys.argv[1:2] == ['--scenario']:
        scenario(sys.argv[2], int(sys.argv[3]), sys.argv[4] == '1')
    else:
        main()
