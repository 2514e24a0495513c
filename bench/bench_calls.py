"""Calls per second through mconnector, beside a plain http.server handler, in one run.

    python bench/bench_calls.py [--calls N] [--rounds R] [--against OTHER/mconnector.py]

Each listener runs in its own process (as services do); the sender is this process.
Rows: sequential calls (microseconds per call, one connection kept alive) and calls from
4 threads, or 4 tasks on one event loop for the asyncio senders (calls per second).  The plain http.server handler is measured twice: with
mconnector's sender and with http.client (one kept-alive connection per thread).  The payload is small: one string argument, one string back.
Where microservices-connector 0.3.7 itself, or Flask + requests (what it runs on, here with
a kept-alive session), are installed, they are measured too; otherwise their row says so.
The asyncio senders call mconnector's listener: AsyncFriend, and httpx.AsyncClient and
aiohttp.ClientSession where those are installed.  Compare the ratios of one run: the machines
these run on are shared and noisy.
"""
import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mconnector  # noqa: E402

LISTENERS = {
    'mconnector': r'''
import sys, mconnector
M = mconnector.Microservice('bench')
@M.typing('/hello')
@M.reply
def hello(name):
    return 'Welcome %s' % name
M.start(port=0, host='127.0.0.1')
print(M.port, flush=True)
sys.stdin.read()
M.stop()
''',
    'http.server (plain handler)': r'''
import sys, json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        out = json.dumps(['Welcome %s' % body['args'][0]]).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(('127.0.0.1', 0), H)
s.daemon_threads = True
threading.Thread(target=s.serve_forever, daemon=True).start()
print(s.server_port, flush=True)
sys.stdin.read()
''',
    'http.server + http.client': None,       # the plain handler, with the stdlib client
    'microservices-connector 0.3.7': r'''
import sys, socket, logging
from microservices_connector.Interservices import Microservice
logging.getLogger('werkzeug').setLevel(logging.ERROR)
M = Microservice('bench')
@M.typing('/hello')
@M.reply
def hello(name):
    return 'Welcome %s' % name
s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
print(port, flush=True)
M.run(port=port, host='127.0.0.1')
''',
    'mconnector + AsyncFriend (asyncio)': None,      # mconnector's listener, async senders
    'mconnector + httpx.AsyncClient': None,
    'mconnector + aiohttp.ClientSession': None,
    'Flask + requests (0.3.7 stack)': r'''
import sys, logging, threading
from flask import Flask, request, jsonify
from werkzeug.serving import make_server
logging.getLogger('werkzeug').setLevel(logging.ERROR)
app = Flask('bench')
@app.route('/hello', methods=['POST'])
def hello():
    return jsonify(['Welcome %s' % request.json['args'][0]])
s = make_server('127.0.0.1', 0, app, threaded=True)
threading.Thread(target=s.serve_forever, daemon=True).start()
print(s.server_port, flush=True)
sys.stdin.read()
''',
}


def start_listener(code, module_dir=None):
    # The listener prints its port once it is about to serve; a few listeners (0.3.7's)
    # only start accepting a moment later, so wait until a connection succeeds.
    import socket
    proc = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=module_dir or os.path.dirname(HERE),    # sys.path[0] of -c
                            env=dict(os.environ, PYTHONPATH=module_dir or os.path.dirname(HERE)))
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        return None, None
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(('127.0.0.1', int(line)), 1).close()
            return proc, int(line)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                proc.wait()
                return None, None
            time.sleep(0.05)


def client_for(name, port):
    """A function that makes one call and checks the answer."""
    url = 'http://127.0.0.1:%d' % port
    if name.startswith('http.server + http.client'):
        import http.client
        local = threading.local()
        body = json.dumps({'args': ['x'], 'kwargs': {}, 'token': None}).encode()

        def call():
            conn = getattr(local, 'conn', None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection('127.0.0.1', port)
            conn.request('POST', '/hello', body, {'Content-Type': 'application/json'})
            assert json.loads(conn.getresponse().read()) == ['Welcome x']
        return call
    if name.startswith('microservices-connector'):
        from microservices_connector.Interservices import Friend
        old = Friend('bench', url)

        def call():
            assert old.send('/hello', 'x') == 'Welcome x'
        return call
    if name.startswith('Flask'):
        import requests
        session = threading.local()

        def call():
            s = getattr(session, 's', None) or setattr(session, 's', requests.Session()) \
                or session.s
            r = s.post(url + '/hello', json={'args': ['x'], 'kwargs': {}, 'token': None})
            assert r.json() == ['Welcome x']
        return call
    friend = mconnector.Friend('bench', url)

    def call():
        assert friend.send('/hello', 'x') == 'Welcome x'
    return call


def async_client_for(name, port):
    """For an asyncio sender: `async with session() as call` gives a coroutine function
    that makes one call and checks the answer, on the running event loop."""
    url = 'http://127.0.0.1:%d' % port
    body = {'args': ['x'], 'kwargs': {}, 'token': None}
    if name.endswith('httpx.AsyncClient'):
        import httpx

        @contextlib.asynccontextmanager
        async def session():
            async with httpx.AsyncClient(base_url=url) as client:
                async def call():
                    assert (await client.post('/hello', json=body)).json() == ['Welcome x']
                yield call
        return session
    if name.endswith('aiohttp.ClientSession'):
        import aiohttp

        @contextlib.asynccontextmanager
        async def session():
            async with aiohttp.ClientSession(url) as client:
                async def call():
                    async with client.post('/hello', json=body) as reply:
                        assert await reply.json() == ['Welcome x']
                yield call
        return session

    @contextlib.asynccontextmanager
    async def session():
        async with mconnector.AsyncFriend('bench', url) as friend:
            async def call():
                assert await friend.send('/hello', 'x') == 'Welcome x'
            yield call
    return session


def measure_async(session, calls, tasks):
    """measure() for an asyncio sender: `tasks` tasks on one event loop."""
    per_task = calls // tasks

    async def run():
        async with session() as call:
            for _ in range(20):         # a connection open before the clock starts
                await call()

            async def task():
                for _ in range(per_task):
                    await call()
            start = time.perf_counter()
            await asyncio.gather(*(task() for _ in range(tasks)))
            return time.perf_counter() - start, per_task * tasks
    return asyncio.run(run())


def measure(call, calls, threads):
    """Seconds for `calls` calls spread over `threads` threads, and the calls made."""
    per_thread = calls // threads

    def run():
        for _ in range(per_thread):
            call()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start, per_thread * threads


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--calls', type=int, default=1000, help='calls per round and row')
    parser.add_argument('--rounds', type=int, default=7,
                        help='rounds; the rows take turns in each, and the median is shown')
    parser.add_argument('--against', metavar='PATH',
                        help='another mconnector.py (an earlier version, say): its listener '
                             'gets a row of its own, called by this Friend')
    options = parser.parse_args()
    running = []
    missing = []
    listeners = list(LISTENERS.items())
    if options.against:
        listeners.insert(1, ('mconnector at ' + options.against, LISTENERS['mconnector']))
    try:
        for name, code in listeners:
            asynchronous = name.startswith('mconnector + ')
            try:
                if name.startswith('Flask'):
                    import flask, requests  # noqa: F401
                elif name.startswith('microservices-connector'):
                    import microservices_connector  # noqa: F401
                elif name.endswith('httpx.AsyncClient'):
                    import httpx  # noqa: F401
                elif name.endswith('aiohttp.ClientSession'):
                    import aiohttp  # noqa: F401
            except ImportError:
                missing.append(name)
                continue
            other = name.startswith('mconnector at ')
            if asynchronous:
                code = LISTENERS['mconnector']
            proc, port = start_listener(code or LISTENERS['http.server (plain handler)'],
                                        os.path.dirname(os.path.abspath(options.against))
                                        if other else None)
            if proc is None:
                missing.append(name)
                continue
            if asynchronous:
                call = async_client_for(name, port)
            else:
                call = client_for(name, port)
                for _ in range(100):
                    call()
            running.append((name, proc, call, [], []))
        # Rows take turns round by round, so that a busy moment of this shared machine
        # hits them all alike; the median of the rounds is what is shown.
        for _ in range(options.rounds):
            for name, proc, call, sequential, parallel in running:
                how = measure_async if name.startswith('mconnector + ') else measure
                seconds, n = how(call, options.calls, 1)
                sequential.append(seconds / n * 1e6)
                seconds, n = how(call, options.calls, 4)
                parallel.append(n / seconds)
    finally:
        for _, proc, _, _, _ in running:
            proc.stdin.close()          # ours stop at the end of their input
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.terminate()        # 0.3.7's listener only stops on a signal
                proc.wait(5)
    median = lambda values: sorted(values)[len(values) // 2]
    rows = [(name, median(seq), median(par)) for name, _, _, seq, par in running]
    base = rows[0]
    print('%-40s %14s %10s %14s %10s' % ('listener + sender', 'sequential us', 'ratio',
                                         '4 at once /s', 'ratio'))
    for name, seq, par in rows:
        print('%-40s %14.0f %9.2fx %14.0f %9.2fx' % (name, seq, seq / base[1], par, par / base[2]))
    for name in missing:
        print('%-40s %14s' % (name, 'not installed'))
    print('(median of %d rounds of %d calls; senders: mconnector.Friend for the mconnector rows'
          ' and the plain handler, then http.client, 0.3.7\'s own Friend, requests.Session;'
          ' 4 at once: 4 threads, or 4 tasks on one event loop for the asyncio senders)'
          % (options.rounds, options.calls))


if __name__ == '__main__':
    main()
