"""What permessage-deflate costs a SocketServer: memory per open connection, and bytes on the
wire for a typical JSON message.

    python bench/bench_ws_deflate.py [--quick] [N]

N connections (default 1000, --quick 200) are opened by SocketClients in a child process
to a SocketServer in another, fresh for each row (so that no row reuses memory another
freed), once with compression off and once with it negotiated.  The
server's memory is read twice: with the connections idle after their handshake, and after
each has sent one 1 KB JSON message and had it echoed (from then on the connection keeps a
compressor and an inflater, as context takeover asks).  Per connection:

  traced   what tracemalloc counts in this process (zlib's buffers included)
  RSS      the growth of the resident set size, from /proc/self/statm (Linux only)
"""

import gc
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import mconnector  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGE = json.dumps([{'id': i, 'user': 'user%d' % i, 'state': 'online'} for i in range(20)])

CLIENTS = textwrap.dedent('''
    import sys
    sys.path.insert(0, %r)
    import mconnector
    url, n, compression = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'deflate'
    options = {} if compression else {'compression': None}
    conns = [mconnector.SocketClient(url, ping_interval=None, **options) for _ in range(n)]
    print('open', flush=True)
    sys.stdin.readline()
    for c in conns:
        c.send(sys.argv[4])
        assert c.recv(30) == sys.argv[4]
    print('sent', flush=True)
    sys.stdin.readline()
    for c in conns:
        c.close()
''' % os.path.join(HERE, '..'))


def rss():
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return None


def measure(n, compression):
    sk = mconnector.SocketServer('bench', compression=compression, ping_interval=None)
    sk.add_route('/echo', lambda message: message)
    sk.run(host='127.0.0.1', port=0)
    try:
        gc.collect()
        base_traced, base_rss = tracemalloc.get_traced_memory()[0], rss()
        child = subprocess.Popen(
            [sys.executable, '-c', CLIENTS, 'ws://127.0.0.1:%d/echo' % sk.port, str(n),
             compression or 'none', MESSAGE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        rows = []
        for step in ('open', 'sent'):
            if child.stdout.readline().strip() != step:
                raise RuntimeError('the clients failed')
            deadline = time.monotonic() + 30
            while len(sk.connections) < n and time.monotonic() < deadline:
                time.sleep(0.05)
            gc.collect()
            traced, now_rss = tracemalloc.get_traced_memory()[0], rss()
            rows.append(((traced - base_traced) / n,
                         None if base_rss is None else (now_rss - base_rss) / n))
            child.stdin.write('\n')
            child.stdin.flush()
        child.wait(60)
        return rows
    finally:
        sk.stop()


def wire_size(compression):
    """Bytes of MESSAGE as the server sends it, the first time and the second."""
    params = mconnector._ws_deflate_accept('permessage-deflate; client_max_window_bits')
    proto = mconnector.WebSocketProtocol(deflate=params if compression else None)
    sizes = []
    for _ in range(2):
        proto.send(MESSAGE)
        sizes.append(len(proto.data_to_send()))
    return sizes


def main():
    if sys.argv[1:2] == ['--one']:             # one row, in a process of its own
        tracemalloc.start()
        print(json.dumps(measure(int(sys.argv[3]), sys.argv[2] if sys.argv[2] != 'off' else None)))
        return
    quick = '--quick' in sys.argv
    numbers = [int(a) for a in sys.argv[1:] if a.isdigit()]
    n = numbers[0] if numbers else (200 if quick else 1000)
    print('server memory per websocket connection, %d connections (KiB)' % n)
    print('%-14s %14s %12s %14s %12s' % ('', 'idle: traced', 'idle: RSS', 'used: traced',
                                          'used: RSS'))
    for compression in (None, 'deflate'):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), '--one',
                              compression or 'off', str(n)], stdout=subprocess.PIPE, text=True,
                             check=True).stdout
        (idle_t, idle_r), (used_t, used_r) = json.loads(out.strip().splitlines()[-1])
        kib = lambda v: '%.1f' % (v / 1024) if v is not None else '-'
        print('%-14s %14s %12s %14s %12s' % (compression or 'off', kib(idle_t), kib(idle_r),
                                              kib(used_t), kib(used_r)))
    print()
    print('a %d-byte JSON message on the wire (bytes): first time, second time' % len(MESSAGE))
    for compression in (None, 'deflate'):
        first, second = wire_size(compression)
        print('%-14s %8d %8d' % (compression or 'off', first, second))


if __name__ == '__main__':
    main()
