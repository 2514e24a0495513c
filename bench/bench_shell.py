"""What idle connections, async rules and slow peers cost mconnector's servers, in one run.

    python bench/bench_shell.py [--idle N] [--rounds R] [--http-idle N] [--concurrent N]
                                [--slow N] [--streams N] [--limit S] [--only WORD]
                                [--against OTHER/mconnector.py]

Each server runs in its own process, started with `python -c` in the directory of the
mconnector.py measured (python -c imports from its cwd); asked `stats` on its stdin, it
answers with its thread count (threading.active_count()) and its resident memory (VmRSS
from /proc/self/status, after gc.collect()).  The clients are this process, with this
directory's mconnector (SocketClient, Friend) and plain sockets; RLIMIT_NOFILE is raised to
the hard limit on both sides.  Rows, with the goal of each figure beside it:

  idle websockets       N websocket connections (default 5000) to one SocketServer, opened
                        by hand in batches (GET upgrade with a fixed Sec-WebSocket-Key, the
                        101 read), then silent (only the server's pings are answered, as any
                        client must).  While they are open: the server's threads, its RSS
                        growth per connection (KB, over its idle RSS before), and the worst
                        of 3 fresh SocketClient connect+send+recv round trips (ms).  Then all
                        are closed at once (and the time until the server next answers on
                        its pipe is shown, the worst of the rounds); R rounds (default 3),
                        and the server's idle RSS once its threads have ended, after each
                        (met: no round above the one before, nor the last above the first,
                        by more than max(2 MB, 10% of what the connections cost while
                        open): allocators keep some).
  idle HTTP keep-alive  N connections (default 1000) to a Microservice, each sent one
                        GET /_mc/health and its answer read, then left open (the listener's
                        idle timeout is raised so that they stay open while measured): its
                        threads, RSS growth per connection, the worst of 3 calls by fresh
                        Friends meanwhile.
  async rule            N concurrent calls (default 256) from N threads, each with its own
                        Friend (one warm-up call each first, so connecting is not timed), to
                        `async def nap(): await asyncio.sleep(0.5); return 1`: the wall time
                        until all have answered (met below 0.8 s), the median call.
  slow peers            a TLS Microservice (tests/certs, request_timeout=3) with N clients
                        (default 20) that send one byte of a ClientHello and stall, N that
                        send a request head and trickle its body (half Content-Length:
                        100000, half chunked), and M (default 12) that call a rule streaming
                        1 MiB pieces and never read; meanwhile the worst of 5 calls by fresh
                        TLS Friends (cafile=tests/certs/ca.pem), spread over 2 s.  Shown
                        too: how many slow peers the listener had dropped 3 s after its
                        request_timeout.

Every row also says how long it took; a row that fails or passes --limit (240 s) says what
happened instead of its missing figures, and every server process is ended at the end.  With --against, the other file's servers are measured in
the same run (same clients) and a ratio column (this / other) is added: compare ratios
within one run, the machines these run on are shared and noisy.  Smaller, quicker run:
--idle 1000 --rounds 2 --concurrent 128.
"""
import argparse
import json
import os
import resource
import select
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CERTS = os.path.join(ROOT, 'tests', 'certs')
sys.path.insert(0, ROOT)

import mconnector  # noqa: E402

SERVER = r'''
import gc, json, os, resource, sys, threading
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
import mconnector
kind, options = sys.argv[1], json.loads(sys.argv[2])
if kind == 'ws':
    sk = mconnector.SocketServer('bench')

    @sk.router('/echo')
    def echo(message):
        return message
    sk.run(host='127.0.0.1', port=0)
    port = sk.port
    stop = lambda: sk.stop(1)
    count = lambda: len(sk.connections) if hasattr(sk, 'connections') else -1
else:
    import asyncio
    M = mconnector.Microservice('bench', max_workers=64, **options.get('service', {}))

    @M.typing('/hello')
    @M.reply
    def hello(name):
        return 'Welcome %s' % name

    @M.typing('/nap')
    @M.reply
    async def nap():
        await asyncio.sleep(0.5)
        return 1

    PIECE = 'x' * (1 << 20)

    @M.typing('/gen')
    @M.stream
    def gen():
        for _ in range(options.get('pieces', 2000)):
            yield PIECE
    M.start(port=0, host='127.0.0.1', **options.get('tls', {}))
    port = M.port
    stop = lambda: M.stop(1)
    count = lambda: -1
print(port, flush=True)
for line in sys.stdin:
    if line.strip() == 'stats':
        gc.collect()
        with open('/proc/self/status') as status:
            rss = status.read().split('VmRSS:')[1].split()[0]
        print(threading.active_count(), rss, count(), flush=True)
    elif line.strip() == 'quit':
        break
stopper = threading.Thread(target=stop, daemon=True)
stopper.start()
stopper.join(10)
if stopper.is_alive():
    sys.stderr.write('bench: stop() had not returned after 10 s\n')
sys.stderr.flush()
os._exit(0)
'''

WS_KEY = 'dGhlIHNhbXBsZSBub25jZQ=='      # RFC 6455's sample key: any fixed one will do
BATCH = 250                             # connections opened at once (the backlog is 1024)


# -- the servers ---------------------------------------------------------------------------

class Server:
    """One server process of `kind` ('ws' or 'http') of the mconnector.py at `path`."""

    def __init__(self, path, kind, **options):
        where = os.path.dirname(os.path.abspath(path))
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, '-c', SERVER, kind, json.dumps(options)], cwd=where,
            env=dict(os.environ, PYTHONPATH=where), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        RUNNING.append(self)
        line = self._line(30)
        if not line.strip().isdigit():
            self.kill()
            raise RuntimeError('the server did not start: %s' % (self.errors()[1] or 'no port'))
        self.port = int(line)

    def _line(self, timeout):
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError('the server did not answer on its pipe within %d s' % timeout)
        return self.proc.stdout.readline()

    def stats(self, timeout=30):
        """(threads, RSS in KB, websocket connections or -1), from the server itself."""
        self.proc.stdin.write('stats\n')
        self.proc.stdin.flush()
        line = self._line(timeout)
        if not line:
            raise RuntimeError('the server process ended (status %s)' % self.proc.poll())
        threads, rss, conns = line.split()
        return int(threads), int(rss), int(conns)

    def settle(self, threads, seconds=60):
        """Wait until the server is back to at most `threads` threads and no websocket
        connection; return its last stats and whether it got there."""
        deadline = time.monotonic() + seconds
        while True:
            now = self.stats(120)
            if now[0] <= threads and now[2] <= 0:
                return now, True
            if time.monotonic() > deadline:
                return now, False
            time.sleep(0.25)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('quit\n')
                self.proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass
        if self in RUNNING:
            RUNNING.remove(self)

    def errors(self):
        """(lines the server wrote to stderr other than INFO/DEBUG log lines, the first
        of them that names an error, or else the first)."""
        self.stderr.seek(0)
        lines = [line.strip() for line in
                 self.stderr.read().decode('utf-8', 'replace').splitlines()
                 if line.strip() and ' INFO ' not in line and ' DEBUG ' not in line]
        named = [line for line in lines
                 if 'Error' in line or 'Exception' in line or line.startswith('bench:')]
        return len(lines), (named[0] if named else (lines[0] if lines else ''))


RUNNING = []        # every server process not yet cleaned up


# -- plain-socket clients ------------------------------------------------------------------

def read_answer(sock, deadline):
    """Read one HTTP answer (head, and a Content-Length body) and return its status line."""
    data = b''
    while b'\r\n\r\n' not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError('closed by the server before it answered')
        data += chunk
    head, _, rest = data.partition(b'\r\n\r\n')
    length = 0
    for line in head.split(b'\r\n')[1:]:
        name, _, value = line.partition(b':')
        if name.strip().lower() == b'content-length':
            length = int(value)
    while len(rest) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head.split(b'\r\n')[0].decode('latin-1')


def open_many(port, request, expect, count, keeper, timeout=30):
    """Open `count` connections in batches; each sends `request` and reads an answer whose
    status line has `expect`.  They are handed to `keeper`.  Returns (opened, error)."""
    opened = 0
    while opened < count:
        batch = []
        deadline = time.monotonic() + timeout
        try:
            for _ in range(min(BATCH, count - opened)):
                batch.append(socket.create_connection(('127.0.0.1', port), timeout))
            for sock in batch:
                sock.sendall(request)
            for sock in batch:
                status = read_answer(sock, deadline)
                if expect not in status:
                    raise ConnectionError('answered %r' % status[:60])
        except (OSError, ValueError) as exc:
            for sock in batch:
                sock.close()
            return opened, 'only %d of %d opened: %s' % (opened, count, describe(exc))
        keeper.add(batch)
        opened += len(batch)
    return opened, None


def tcp_open(sock):
    """Whether the peer has neither closed nor reset this connection (TCP_INFO's state,
    on Linux; elsewhere: not readable)."""
    try:
        if hasattr(socket, 'TCP_INFO'):
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


class Keeper(threading.Thread):
    """Holds idle connections: answers the pings of a websocket server on them (with an
    empty-mask pong) every 0.2 s, and closes them all at the end."""

    def __init__(self, websocket):
        super().__init__(daemon=True)
        self.websocket = websocket
        self.socks = []
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.start()

    def add(self, socks):
        with self.lock:
            for sock in socks:
                sock.setblocking(False)
                self.socks.append(sock)
                if self.websocket:
                    self.selector.register(sock, selectors.EVENT_READ)

    def run(self):
        while not self.done.wait(0.2):
            with self.lock:
                for key, _ in self.selector.select(0):
                    self._answer(key.fileobj)

    def _answer(self, sock):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        at = 0
        while data and at + 2 <= len(data):
            opcode, size = data[at] & 0x0f, data[at + 1] & 0x7f
            if size > 125:
                break           # not a control frame: never sent to a silent client
            if opcode == 0x9:
                try:
                    sock.send(b'\x8a' + bytes([0x80 | size]) + b'\0\0\0\0' +
                              data[at + 2:at + 2 + size])
                except OSError:
                    pass
            elif opcode == 0x8:
                data = b''
            at += 2 + size
        if not data:
            self.selector.unregister(sock)     # closed by the server: its state shows it

    def still_open(self):
        with self.lock:
            return sum(tcp_open(sock) for sock in self.socks), len(self.socks)

    def close(self):
        self.done.set()
        self.join(5)
        with self.lock:
            for sock in self.socks:
                sock.close()
            self.socks = []
            self.selector.close()


def describe(exc):
    text = str(exc) or type(exc).__name__
    return '%s: %s' % (type(exc).__name__, text[:100]) if type(exc).__name__ not in text \
        else text[:100]


# -- the rows ------------------------------------------------------------------------------

def fresh_websocket_call(port, timeout=10):
    """ms for a new SocketClient's connect + send + recv; the close is not timed."""
    started = time.perf_counter()
    client = mconnector.SocketClient('127.0.0.1:%d' % port, '/echo', timeout=timeout)
    try:
        client.send('ping')
        answer = client.recv(timeout=timeout)
        took = (time.perf_counter() - started) * 1000
        if answer != 'ping':
            raise ValueError('echoed %r' % (answer,))
        return took
    finally:
        closer = threading.Thread(target=client.close, daemon=True)
        closer.start()
        closer.join(5)


def fresh_friend_call(url, timeout=10, **tls):
    """ms for a call by a new Friend (so on a new connection, and TLS handshake)."""
    friend = mconnector.Friend('bench', url, timeout=timeout, retries=0, **tls)
    started = time.perf_counter()
    answer = friend.send('/hello', 'x')
    took = (time.perf_counter() - started) * 1000
    if answer != 'Welcome x':
        raise ValueError('answered %r' % (answer,))
    return took


def worst_of(calls, notes, what, pause=0.0):
    """The slowest of these timed calls in ms (a failed call counts as its error)."""
    times = []
    for call in calls:
        try:
            times.append(call())
        except Exception as exc:
            notes.append('%s failed: %s' % (what, describe(exc)))
            return 'failed'
        time.sleep(pause)
    return max(times)


def row_idle_websockets(path, options, figures, notes):
    server = Server(path, 'ws')
    n = options.idle
    fresh_websocket_call(server.port)           # warm-up: what a first connection loads
    base_threads, base_rss, _ = server.stats()
    figures['base'] = '%d threads, %.1f MB' % (base_threads, base_rss / 1024)
    request = ('GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n'
               'Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13'
               '\r\n\r\n' % (server.port, WS_KEY)).encode()
    idle = []
    for round_ in range(options.rounds):
        keeper = Keeper(websocket=True)
        try:
            started = time.monotonic()
            opened, error = open_many(server.port, request, ' 101 ', n, keeper)
            if round_ == 0:
                figures['open_s'] = time.monotonic() - started
            if error:
                notes.append('round %d: %s' % (round_ + 1, error))
            time.sleep(0.5)
            threads, rss, _ = server.stats()
            if round_ == 0:
                figures['threads'] = threads
                if opened:
                    figures['kb_per_conn'] = (rss - base_rss) / opened
                figures['fresh_ms'] = worst_of([lambda: fresh_websocket_call(server.port)] * 3,
                                               notes, 'fresh websocket call')
                alive, total = keeper.still_open()
                figures['open'] = '%d/%d' % (alive, n)
        finally:
            keeper.close()
        # How long the server takes to answer its pipe once they have all gone at once.
        closed = time.monotonic()
        server.stats(120)
        figures['close_stall_s'] = max(figures.get('close_stall_s', 0),
                                       time.monotonic() - closed)
        (threads, rss, conns), settled = server.settle(base_threads + 2)
        if not settled:
            notes.append('round %d: 60 s after the close the server still had %d threads, '
                         '%d connections' % (round_ + 1, threads, conns))
        # threading.active_count() drops before the threads' stacks are given back
        time.sleep(1)
        idle.append(server.stats()[1] / 1024)
        figures['idle_mb'] = idle
    server.close()
    return server


def row_idle_http(path, options, figures, notes):
    # The listener's idle timeout (15 s by default) is raised: they must stay open while
    # measured, however slowly they are opened.
    server = Server(path, 'http', service={'timeout': 600})
    n = options.http_idle
    url = 'http://127.0.0.1:%d' % server.port
    fresh_friend_call(url)
    base_threads, base_rss, _ = server.stats()
    figures['base'] = '%d threads, %.1f MB' % (base_threads, base_rss / 1024)
    keeper = Keeper(websocket=False)
    try:
        started = time.monotonic()
        opened, error = open_many(server.port, b'GET /_mc/health HTTP/1.1\r\nHost: x\r\n\r\n',
                                  ' 200 ', n, keeper)
        figures['open_s'] = time.monotonic() - started
        if error:
            notes.append(error)
        time.sleep(1.5)         # time for workers holding connections to park them
        threads, rss, _ = server.stats()
        figures['threads'] = threads
        if opened:
            figures['kb_per_conn'] = (rss - base_rss) / opened
        figures['fresh_ms'] = worst_of([lambda: fresh_friend_call(url)] * 3, notes,
                                       'fresh Friend call')
        alive, total = keeper.still_open()
        figures['open'] = '%d/%d' % (alive, n)
    finally:
        keeper.close()
    server.close()
    return server


def row_async(path, options, figures, notes):
    server = Server(path, 'http')
    n = options.concurrent
    url = 'http://127.0.0.1:%d' % server.port
    friends = [mconnector.Friend('bench', url, timeout=60, retries=0) for _ in range(n)]
    for friend in friends:
        friend.send('/hello', 'x')          # each keeps its connection for the timed call
    barrier = threading.Barrier(n + 1)
    ends = [None] * n
    failures = []

    def call(i):
        barrier.wait(30)
        try:
            answer = friends[i].send('/nap')
            if answer != 1:
                raise ValueError('answered %r' % (answer,))
            ends[i] = time.perf_counter()
        except Exception as exc:
            failures.append(describe(exc))
    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    barrier.wait(30)
    started = time.perf_counter()
    time.sleep(0.25)
    figures['threads'] = server.stats()[0]
    for thread in threads:
        thread.join(max(0.0, started + 70 - time.perf_counter()))   # calls time out at 60 s
    finished = [end - started for end in ends if end is not None]
    figures['ok'] = '%d/%d' % (len(finished), n)
    if failures:
        notes.append('%d call(s) failed, e.g. %s' % (len(failures), failures[0]))
    if any(thread.is_alive() for thread in threads):
        notes.append('%d call(s) still unanswered after %.0f s'
                     % (sum(t.is_alive() for t in threads), time.perf_counter() - started))
    if len(finished) == n:
        figures['wall_s'] = max(finished)
    elif finished:
        figures['wall_s'] = 'incomplete'
    if finished:
        figures['median_s'] = statistics.median(finished)
    server.close()
    return server


def row_slow_peers(path, options, figures, notes):
    timeout = 3
    server = Server(path, 'http', service={'request_timeout': timeout},
                    tls={'certfile': os.path.join(CERTS, 'server.pem'),
                         'keyfile': os.path.join(CERTS, 'server.key')})
    ca = os.path.join(CERTS, 'ca.pem')
    url = 'https://127.0.0.1:%d' % server.port
    fresh_friend_call(url, cafile=ca)
    context = ssl.create_default_context(cafile=ca)
    address = ('127.0.0.1', server.port)
    n, m = options.slow, options.streams
    hellos, bodies, streams = [], [], []
    stop = threading.Event()
    failed = []

    def tls():
        return context.wrap_socket(socket.create_connection(address, 5),
                                   server_hostname='127.0.0.1')

    def trickle():
        while not stop.wait(0.25):
            for sock, piece in list(bodies):
                if (sock, piece) in gone:
                    continue
                try:
                    sock.send(piece)
                except (OSError, ValueError):
                    gone.add((sock, piece))
    gone = set()
    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        # The ones that need the server's help to get going first, the stalled hellos
        # (no help needed) last: all are there while the normal calls are timed.
        began = time.monotonic()
        for _ in range(m):
            try:
                sock = tls()
                sock.sendall(b'POST /gen HTTP/1.1\r\nHost: x\r\nContent-Type: application/json'
                             b'\r\nContent-Length: 2\r\n\r\n{}')
                streams.append(sock)
            except OSError as exc:
                failed.append('unread stream: %s' % describe(exc))
        for i in range(n):
            chunked = i % 2
            head = ('POST /hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s'
                    '\r\n' % ('Transfer-Encoding: chunked\r\n' if chunked
                              else 'Content-Length: 100000\r\n')).encode()
            try:
                sock = tls()
                sock.sendall(head)
                bodies.append((sock, b'1\r\n \r\n' if chunked else b' '))
            except OSError as exc:
                failed.append('trickled body: %s' % describe(exc))
        trickler.start()
        for _ in range(n):
            try:
                sock = socket.create_connection(address, 5)
                sock.sendall(b'\x16')       # a TLS record's first byte, and no more
                hellos.append(sock)
            except OSError as exc:
                failed.append('stalled hello: %s' % describe(exc))
        figures['setup_s'] = time.monotonic() - began
        set_up = time.monotonic()
        figures['peers'] = '%d/%d/%d' % (len(hellos), len(bodies), len(streams))
        if failed:
            notes.append('%d slow peer(s) could not connect, e.g. %s' % (len(failed), failed[0]))
        times = []
        for i in range(5):
            time.sleep(0.4)
            try:
                times.append(fresh_friend_call(url, cafile=ca))
            except Exception as exc:
                notes.append('normal call %d (%.1f s after the slow peers) failed: %s'
                             % (i + 1, time.monotonic() - set_up, describe(exc)))
                times.append(None)
            if i == 1:
                figures['threads'] = server.stats()[0]
        done = [t for t in times if t is not None]
        figures['worst_ms'] = max(done) if len(done) == len(times) else 'failed'
        if done:
            figures['median_ms'] = statistics.median(done)
        time.sleep(max(0.0, set_up + timeout + 3 - time.monotonic()))
        stop.set()
        trickler.join(5)
        dropped_hellos = sum(not tcp_open(sock) for sock in hellos)
        dropped_bodies = sum(((s, p) in gone) or not tcp_open(s) for s, p in bodies)
        dropped_streams = sum(stream_cut(sock) for sock in streams)
        figures['dropped'] = '%d/%d/%d' % (dropped_hellos, dropped_bodies, dropped_streams)
    finally:
        stop.set()
        for sock in hellos + [s for s, _ in bodies] + streams:
            sock.close()
    server.close()
    return server


def stream_cut(sock, most=80 << 20, seconds=2.0):
    """Whether the server has given up on this unread stream: the end of what it sent
    comes within `most` bytes (more than the kernel's buffers hold) and `seconds`."""
    deadline = time.monotonic() + seconds
    got = 0
    try:
        while got < most and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(1 << 20)
            if not data:
                return True
            got += len(data)
    except socket.timeout:
        return False
    except (OSError, ValueError):
        return True
    return False


def no_growth(mbs, figures):
    """No round's idle RSS above the one before, nor the last above the first, by more
    than max(2 MB, 10% of what the connections cost while open): allocators keep some."""
    opened = int(figures.get('open', '0/0').split('/')[1])
    allowed = max(2.0, 0.1 * figures.get('kb_per_conn', 0) * opened / 1024)
    return all(b - a <= allowed for a, b in zip(mbs, mbs[1:])) and mbs[-1] - mbs[0] <= allowed


def all_of(text, figures):
    done, total = text.split('/')
    return done == total


# (key, label, format, goal, check) per figure; figures not measured show what happened.
def layout(options):
    return [
        ('idle websockets, %d open, %d rounds' % (options.idle, options.rounds),
         row_idle_websockets, [
             ('base', 'server before (after one call)', '%s', '', None),
             ('open_s', 'seconds to open them (round 1)', '%.1f', '', None),
             ('threads', 'server threads, all open', '%d', '<= 80', lambda v, f: v <= 80),
             ('kb_per_conn', 'RSS growth per connection, KB', '%.1f', '<= 12',
              lambda v, f: v <= 12),
             ('fresh_ms', 'fresh connect+send+recv, ms (worst of 3)', '%.1f', 'within 1 s',
              lambda v, f: v < 1000),
             ('open', 'still open when measured', '%s', 'all', all_of),
             ('close_stall_s', 'server\'s first answer after the close, s', '%.1f', '', None),
             ('idle_mb', 'idle RSS after each round, MB', '%s', 'no growth round to round',
              no_growth),
         ]),
        ('idle HTTP keep-alive, %d open' % options.http_idle, row_idle_http, [
            ('base', 'server before (after one call)', '%s', '', None),
            ('open_s', 'seconds to open them', '%.1f', '', None),
            ('threads', 'server threads, all open', '%d', 'none per connection (<= 80)',
             lambda v, f: v <= 80),
            ('kb_per_conn', 'RSS growth per connection, KB', '%.1f', '', None),
            ('fresh_ms', 'fresh Friend call, ms (worst of 3)', '%.1f', 'within 1 s',
             lambda v, f: v < 1000),
            ('open', 'still open when measured', '%s', 'all', all_of),
        ]),
        ('async rule, %d concurrent (asyncio.sleep(0.5))' % options.concurrent, row_async, [
            ('wall_s', 'wall time until all answered, s', '%.2f', 'about 0.5 s (< 0.8)',
             lambda v, f: v < 0.8),
            ('median_s', 'median call, s', '%.2f', '', None),
            ('ok', 'answered 1', '%s', 'all', all_of),
            ('threads', 'server threads 0.25 s in', '%d', '', None),
        ]),
        ('slow peers, TLS, request_timeout=3', row_slow_peers, [
            ('peers', 'stalled hello/trickled body/unread stream', '%s', '', None),
            ('setup_s', 'seconds to connect them', '%.1f', '', None),
            ('worst_ms', 'normal TLS Friend call, ms (worst of 5)', '%.0f', 'under 1 s',
             lambda v, f: v < 1000),
            ('median_ms', 'normal TLS Friend call, ms (median)', '%.0f', '', None),
            ('threads', 'server threads meanwhile', '%d', '', None),
            ('dropped', 'dropped by the server at timeout+3 s', '%s', '', None),
        ]),
    ]


def run_row(function, path, options):
    """Run one row for one mconnector.py, cut off after options.limit seconds; returns
    (figures, notes, seconds)."""
    figures, notes, servers = {}, [], []
    started = time.monotonic()

    def body():
        try:
            servers.append(function(path, options, figures, notes))
        except Exception as exc:
            notes.append('error: %s' % describe(exc))
    before = list(RUNNING)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(options.limit)
    if thread.is_alive():
        figures = dict(figures)     # what was measured in time: not what follows the kill
        notes.append('timed out after %g s' % options.limit)
        for server in [s for s in RUNNING if s not in before]:
            servers.append(server)
            server.kill()           # its sockets fail: the row's clients give up
        thread.join(15)
    for server in servers or [s for s in RUNNING if s not in before]:
        if server is None:
            continue
        lines, first = server.errors()
        if lines:
            notes.append('server stderr: %d line(s), e.g. %s' % (lines, first[:110]))
    for server in [s for s in RUNNING if s not in before]:
        server.kill()
    return figures, notes, time.monotonic() - started


def cell(value, fmt):
    if value is None:
        return '-'
    if isinstance(value, list):
        return ' / '.join('%.1f' % v for v in value)
    if isinstance(value, str) or fmt == '%s':
        return str(value)
    return fmt % value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--idle', type=int, default=5000, help='idle websockets per round')
    parser.add_argument('--rounds', type=int, default=3, help='rounds of idle websockets')
    parser.add_argument('--http-idle', type=int, default=1000,
                        help='idle keep-alive HTTP connections')
    parser.add_argument('--concurrent', type=int, default=256,
                        help='concurrent calls to the async rule')
    parser.add_argument('--slow', type=int, default=20,
                        help='stalled TLS hellos, and trickled bodies, in the slow-peers row')
    parser.add_argument('--streams', type=int, default=12,
                        help='unread streamed answers in the slow-peers row')
    parser.add_argument('--limit', type=float, default=240,
                        help='seconds one row may take before it is cut off')
    parser.add_argument('--only', metavar='WORD', help='run only the rows whose name has WORD')
    parser.add_argument('--against', metavar='PATH',
                        help='another mconnector.py (an earlier version, say): its servers '
                             'are measured too, by the same clients')
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = options.idle + options.http_idle + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY
                                                    else max(soft, hard), hard))
    versions = [('mconnector', os.path.join(ROOT, 'mconnector.py'))]
    if options.against:
        where = os.path.abspath(options.against)
        label = os.path.basename(os.path.dirname(where))        # the folder says which
        if os.path.basename(where) != 'mconnector.py':
            label = os.path.join(label, os.path.basename(where))
        versions.append(('at ' + (label if len(label) <= 18 else '...' + label[-15:]),
                         options.against))
    results = []
    started = time.monotonic()
    try:
        for name, function, figures in layout(options):
            if options.only and options.only.lower() not in name.lower():
                continue
            measured = []
            for label, path in versions:
                print('%s: %s...' % (name, label), file=sys.stderr, flush=True)
                measured.append(run_row(function, path, options))
            results.append((name, figures, measured))
    finally:
        for server in list(RUNNING):
            server.close()
    width = 44
    head = '%-*s' % (width, 'row / figure') + ''.join('%22s' % label[:21] for label, _ in versions)
    if len(versions) > 1:
        head += '%9s' % 'ratio'
    print(head + '  %-28s %s' % ('goal', 'met'))
    for name, figures, measured in results:
        print(name)
        for key, label, fmt, goal, check in figures:
            values = [got.get(key) for got, _, _ in measured]
            each = [got for got, _, _ in measured]
            line = '  %-*s' % (width - 2, label) + ''.join('%22s' % cell(v, fmt) for v in values)
            if len(versions) > 1:
                a, b = values[0], values[1]
                numeric = all(isinstance(v, (int, float)) for v in (a, b))
                line += '%9s' % ('%.3gx' % (a / b) if numeric and b else '')
            met = ''
            if check is not None:
                marks = []
                for value, got in zip(values, each):
                    try:
                        marks.append('-' if value is None or value in ('failed', 'incomplete')
                                     else ('yes' if check(value, got) else 'NO'))
                    except (TypeError, ValueError, IndexError):
                        marks.append('-')
                met = '/'.join(marks)
            print(line + '  %-28s %s' % (goal, met))
        print('  %-*s' % (width - 2, 'row took, s') +
              ''.join('%22.0f' % seconds for _, _, seconds in measured))
        for (label, _), (_, notes, _) in zip(versions, measured):
            for note in notes:
                print('  ! %s: %s' % (label, note))
    print('(%s, %d cores; whole run %.0f s; "-": not measured, see the notes; compare ratios '
          'within one run)' % (sys.version.split()[0], os.cpu_count() or 0,
                               time.monotonic() - started))


if __name__ == '__main__':
    main()
