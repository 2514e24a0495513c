"""One call's cost against its floor: mconnector, a raw TCP ping-pong of the same bytes, Pyro5.

    python bench/bench_floor.py [--rounds R] [--quick] [--against OTHER/mconnector.py]

For each size (a short string, then 10 KB, 100 KB and 1 MB strings, echoed: the same size
each way) the rows are:

  raw TCP floor      two Python processes, one connection: the sender writes the exact bytes
                     of mconnector's request for that call (captured from the wire at the
                     start of the run) and reads the exact bytes of its response, which the
                     other process writes once it has read the request; no parsing, no JSON
  mconnector         Friend(...).send('/echo', s) to a Microservice rule in its own process
  Pyro5              a proxy calling an exposed echo method in its own process (when Pyro5 is
                     installed; the row is skipped otherwise)
  mconnector at ...  with --against: another mconnector.py (an earlier version, say), its
                     listener called by its own Friend, in the same rounds

Columns: microseconds per call (wall, one connection kept alive, calls one after another),
the sender's own CPU per call (this process's user + system time), the listener's (from
/proc: coarse, clock ticks of 10 ms over the round), and the ratios the goals
name: mconnector / floor (goal: at most 2.0x for the short string) and Pyro5 / mconnector
(goal: at least 1.5x).  Rows take turns within each round; the median of the rounds is shown.
Compare ratios within one run: the machine is shared and noisy.
"""
import argparse
import os
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import mconnector  # noqa: E402

SIZES = [('small', 'hi'), ('10 KB', 'x' * 10000), ('100 KB', 'x' * 100000),
         ('1 MB', 'x' * 1000000)]
CALLS = {'small': 2000, '10 KB': 1000, '100 KB': 200, '1 MB': 30}

MCONNECTOR = r'''
import sys, mconnector
M = mconnector.Microservice('bench')
@M.typing('/echo')
@M.reply
def echo(text):
    return text
M.start(port=0, host='127.0.0.1')
print(M.port, flush=True)
sys.stdin.read()
M.stop()
'''

# The floor's listener: per connection, an 8-byte preamble says how many bytes a request has
# and how many the response has; then, for every request read in full, the response is
# written in one sendall.
RAW = r'''
import socket, struct, sys, threading
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def read(n):
        buf = bytearray(n); view = memoryview(buf); got = 0
        while got < n:
            k = conn.recv_into(view[got:])
            if not k:
                return None
            got += k
        return buf
    n, m = struct.unpack('!II', read(8))
    response = read(m)
    while read(n) is not None:
        conn.sendall(response)
listener = socket.socket()
listener.bind(('127.0.0.1', 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
def accept():
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
sys.stdin.read()
'''

PYRO5 = r'''
import sys, threading, Pyro5.api
@Pyro5.api.expose
class Echo:
    def echo(self, text):
        return text
daemon = Pyro5.api.Daemon(host='127.0.0.1')
uri = daemon.register(Echo)
print(uri, flush=True)
threading.Thread(target=daemon.requestLoop, daemon=True).start()
sys.stdin.read()
'''


def start(code, folder=ROOT):
    proc = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=folder,
                            env=dict(os.environ, PYTHONPATH=folder))
    return proc, proc.stdout.readline().strip()


def read_exactly(sock, view):
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError('closed')
        got += k


def capture(port, text):
    """The bytes of one mconnector call's request and response, as they travel."""
    relay = socket.socket()
    relay.bind(('127.0.0.1', 0))
    relay.listen()
    seen = {'request': bytearray(), 'response': bytearray()}

    def pump(src, dst, key):
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:         # the other way round closed it
                data = b''
            if not data:
                dst.close()
                return
            seen[key] += data
            dst.sendall(data)

    def run():
        conn, _ = relay.accept()
        upstream = socket.create_connection(('127.0.0.1', port))
        threading.Thread(target=pump, args=(conn, upstream, 'request'), daemon=True).start()
        pump(upstream, conn, 'response')
    threading.Thread(target=run, daemon=True).start()
    friend = mconnector.Friend('bench', 'http://127.0.0.1:%d' % relay.getsockname()[1])
    assert friend.send('/echo', text) == text
    friend.close()
    relay.close()
    return bytes(seen['request']), bytes(seen['response'])


def raw_caller(port, request, response):
    sock = socket.create_connection(('127.0.0.1', port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack('!II', len(request), len(response)) + response)
    buf = bytearray(len(response))
    view = memoryview(buf)

    def call():
        sock.sendall(request)
        read_exactly(sock, view)
    return call


def mconnector_caller(port, text, module=mconnector):
    friend = module.Friend('bench', 'http://127.0.0.1:%d' % port)

    def call():
        assert friend.send('/echo', text) is not None
    return call


def pyro_caller(uri, text):
    import Pyro5.api
    proxy = Pyro5.api.Proxy(uri)

    def call():
        assert proxy.echo(text) is not None
    return call


def process_cpu(pid):
    """User + system seconds of another process so far."""
    with open('/proc/%d/stat' % pid) as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def measure(call, pid, n):
    """(wall us, this process's CPU us, the listener's CPU us) per call over n calls."""
    other, cpu, wall = process_cpu(pid), time.process_time(), time.perf_counter()
    for _ in range(n):
        call()
    return ((time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6,
            (process_cpu(pid) - other) / n * 1e6)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--quick', action='store_true', help='a tenth of the calls')
    parser.add_argument('--against', metavar='PATH', help='another mconnector.py')
    options = parser.parse_args()
    other = None
    if options.against:
        import importlib.util
        spec = importlib.util.spec_from_file_location('mconnector_against', options.against)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
    procs = []
    try:
        mc, mc_port = start(MCONNECTOR)
        raw, raw_port = start(RAW)
        procs += [mc, raw]
        if other is not None:
            against, against_port = start(MCONNECTOR,
                                          os.path.dirname(os.path.abspath(options.against)))
            procs.append(against)
        try:
            import Pyro5.api  # noqa: F401
            pyro, uri = start(PYRO5)
            procs.append(pyro)
        except ImportError:
            uri = None
        rows = {}           # (size, row name) -> call
        for size, text in SIZES:
            request, response = capture(int(mc_port), text)
            rows[size, 'raw TCP floor'] = raw_caller(int(raw_port), request, response), raw.pid
            rows[size, 'mconnector'] = mconnector_caller(int(mc_port), text), mc.pid
            if other is not None:
                rows[size, 'mconnector at --against'] = mconnector_caller(
                    int(against_port), text, other), against.pid
            if uri:
                rows[size, 'Pyro5 %s' % Pyro5.__version__] = pyro_caller(uri, text), pyro.pid
        results = {key: [] for key in rows}
        for key, (call, pid) in rows.items():
            for _ in range(20):
                call()
        for _ in range(options.rounds):
            for key, (call, pid) in rows.items():
                n = max(CALLS[key[0]] // (10 if options.quick else 1), 5)
                results[key].append(measure(call, pid, n))
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(10)

    def median(values):
        return sorted(values)[len(values) // 2]
    print('%-7s %-23s %10s %12s %14s %10s %12s' % ('size', 'row', 'us/call', 'sender CPU',
                                                    'listener CPU', 'vs floor', 'Pyro5/mconn'))
    for size, _ in SIZES:
        cells = {name: [median([m[i] for m in r]) for i in range(3)]
                 for (s, name), r in results.items() if s == size}
        floor = cells['raw TCP floor'][0]
        mine = cells['mconnector'][0]
        for name, (wall, cpu, listener) in cells.items():
            other = ('%11.2fx' % (wall / mine)) if name.startswith('Pyro5') else ''
            print('%-7s %-23s %10.0f %12.0f %14.0f %9.2fx %12s' % (
                size, name, wall, cpu, listener, wall / floor, other))
        if not any(name.startswith('Pyro5') for name in cells):
            print('%-7s %-23s %10s' % (size, 'Pyro5', 'not installed'))
    print('(median of %d rounds; goals: mconnector at most 2.0x the floor for the small call,'
          ' Pyro5/mconnector at least 1.5x at every size)' % options.rounds)


if __name__ == '__main__':
    main()
