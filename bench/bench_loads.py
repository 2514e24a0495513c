"""What the listener's strict JSON parsing, and a call without its token, cost against
json.loads, on large hostile bodies.

    python bench/bench_loads.py [--mb N] [--repeat R] [--against OTHER/mconnector.py]

For each body (N MiB, default 16) the first rows give the best of R runs of json.loads
and of mconnector.loads (which refuses duplicate keys, NaN and Infinity, numbers out of
range, and nesting over MAX_DEPTH).  The last rows send each body to a live listener, to a
rule guarded by a token, without the token, and time the answer (a 4xx): what anyone who can
reach the listener can make it spend, per MiB, beside json.loads of the same body, and beside
the same request with a wrong Bearer token (refused before its body is parsed: what carrying
the body costs alone).
"""
import argparse
import importlib.util
import json
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def bodies(mb):
    size = mb * 1024 * 1024
    nest = '[' * 150 + ']' * 150
    small = '{"a": 1, "b": "x"}'
    call = '{"args": [%s], "kwargs": {}, "token": null}'
    return [
        ('[[],[],...]', '[' + '[],' * (size // 3) + '[]]'),
        ('150-deep lists', '[' + ','.join([nest] * (size // 301)) + ']'),
        ('small objects', '[' + ','.join([small] * (size // 19)) + ']'),
        ('0.3.7 call, strings', call % ','.join(['"%s"' % ('x' * 62)] * (size // 65))),
    ]


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def unauthenticated(module, body, repeat, bearer=False):
    M = module.Microservice('bench', max_body=len(body) + 1024, token={'/guarded': 't0k'})

    @M.typing('/guarded')
    @M.reply
    def guarded(*args):
        raise AssertionError('ran without its token')
    M.start(port=0, host='127.0.0.1')
    head = (b'POST /guarded HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s'
            b'Content-Length: %d\r\nConnection: close\r\n\r\n'
            % (b'Authorization: Bearer wrong\r\n' if bearer else b'', len(body)))

    def call():
        with socket.create_connection(('127.0.0.1', M.port)) as sock:
            sock.sendall(head + body)
            reply = b''
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        assert reply[9:10] == b'4', reply[:200]
        statuses.add(reply[9:12].decode())
    statuses = set()
    try:
        return best(call, repeat), '/'.join(sorted(statuses))
    finally:
        M.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--mb', type=int, default=16)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--against', help='another mconnector.py to measure')
    options = parser.parse_args()
    path = options.against or os.path.join(HERE, '..', 'mconnector.py')
    spec = importlib.util.spec_from_file_location('mconnector_measured', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print('%s, Python %s, %d MiB bodies, best of %d'
          % (os.path.relpath(path), sys.version.split()[0], options.mb, options.repeat))
    print('%-22s %12s %16s %8s' % ('body', 'json.loads', 'mconnector.loads', 'ratio'))
    measured = []
    for name, text in bodies(options.mb):
        data = text.encode('utf-8')
        plain = best(lambda: json.loads(data), options.repeat)
        strict = best(lambda: module.loads(data), options.repeat)
        measured.append((name, data, plain))
        print('%-22s %11.3fs %15.3fs %7.2fx' % (name, plain, strict, strict / plain))
    print()
    print('%-22s %6s %16s %16s %16s' % ('no token', 'status', 'listener s/MiB',
                                         'wrong Bearer', 'json.loads s/MiB'))
    for name, data, plain in measured:
        seconds, status = unauthenticated(module, data, options.repeat)
        transport, _ = unauthenticated(module, data, options.repeat, bearer=True)
        mib = len(data) / 1048576
        print('%-22s %6s %16.4f %16.4f %16.4f' % (name, status, seconds / mib,
                                                  transport / mib, plain / mib))


if __name__ == '__main__':
    main()
