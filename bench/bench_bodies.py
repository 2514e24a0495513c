"""What one request body costs the listener in memory, by how it is framed, in one run.

    python bench/bench_bodies.py [--mb N] [--against OTHER/mconnector.py]

Each listener runs in its own process; this process sends it one body of N MiB of data
(default 6) to a rule that returns the body's length, framed as one Content-Length, as
64 KiB chunks, as 16-byte chunks, and as 2-byte chunks, and reads the listener's peak
resident memory (VmHWM, Linux) before and after.  The row shows how much the peak grew
for that one body, the answer's status, and the time the request took.  A body costs at
least its size twice (the data as read, and the string the rule receives).
"""
import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

LISTENER = r'''
import sys, mconnector
M = mconnector.Microservice('bench', max_body=64 * 1024 * 1024)
@M.typing('/size')
@M.dict
def size(data):
    return len(data)
M.start(port=0, host='127.0.0.1')
print(M.port, flush=True)
for line in sys.stdin:
    print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], flush=True)
M.stop()
'''


def body(size, chunk):
    data = b'{"data": "' + b'a' * (size - 12) + b'"}'
    if chunk is None:
        return b'Content-Length: %d\r\n\r\n%s' % (len(data), data)
    parts = [b'Transfer-Encoding: chunked\r\n\r\n']
    for i in range(0, len(data), chunk):
        piece = data[i:i + chunk]
        parts.append(b'%x\r\n%s\r\n' % (len(piece), piece))
    parts.append(b'0\r\n\r\n')
    return b''.join(parts)


def measure(path, request):
    where = os.path.dirname(os.path.abspath(path))     # (python -c imports from its cwd)
    proc = subprocess.Popen([sys.executable, '-c', LISTENER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=where, text=True)
    try:
        port = int(proc.stdout.readline())
        proc.stdin.write('\n')
        proc.stdin.flush()
        before = int(proc.stdout.readline())
        started = time.perf_counter()
        with socket.create_connection(('127.0.0.1', port)) as sock:
            try:
                sock.sendall(request)
            except OSError:             # refused before the whole body was sent
                pass
            reply = b''
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                reply += data
        seconds = time.perf_counter() - started
        proc.stdin.write('\n')
        proc.stdin.flush()
        after = int(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(10)
    return (after - before) / 1024, reply[9:12].decode() or 'none', seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--mb', type=float, default=6, help='MiB of data in the body')
    parser.add_argument('--against', metavar='PATH', help='another mconnector.py to compare')
    options = parser.parse_args()
    size = int(options.mb * 1024 * 1024)
    versions = [('mconnector', os.path.join(HERE, '..', 'mconnector.py'))]
    if options.against:
        versions.append(('at ' + options.against[-28:], options.against))
    print('%-34s %-18s %12s %7s %9s' % ('listener', 'framing', 'peak +MiB', 'status', 'seconds'))
    for framing, chunk in (('Content-Length', None), ('64 KiB chunks', 65536),
                           ('16-byte chunks', 16), ('2-byte chunks', 2)):
        request = (b'POST /size HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                   b'Connection: close\r\n' + body(size, chunk))
        for name, path in versions:
            grown, status, seconds = measure(path, request)
            print('%-34s %-18s %12.1f %7s %9.2f' % (name, framing, grown, status, seconds))


if __name__ == '__main__':
    main()
