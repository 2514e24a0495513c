"""Start-up and footprint: import time, process start to first answer, idle listener RSS.

    python bench/bench_start.py [--runs N]

Each figure is measured with mconnector's bytecode cached (its __pycache__ written
beforehand) and without (a copy of mconnector.py in a folder with no __pycache__, run with
-B, so that nothing is written): the standard library's own cached bytecode is used in both,
as it is on any installed Python.  Beside each, bare python: the same process with no
mconnector (for the first answer and the RSS, a listener on the socket module alone that
answers one HTTP request).  The median of N runs is shown, with the goal beside it.

  import mconnector      the time of the import statement, inside the process
  start to first answer  from spawning `python -c <listener>` to the first answer read by
                         a raw socket that polls the listener's port
  idle listener RSS      VmRSS of that listener once it has answered and sat idle
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT = '''
import time
t = time.perf_counter()
import mconnector
print((time.perf_counter() - t) * 1000)
'''
IMPORT_BARE = '''
import time
t = time.perf_counter()
print((time.perf_counter() - t) * 1000)
'''
LISTENER = '''
import sys, mconnector
M = mconnector.Microservice('start')
@M.typing('/echo')
@M.reply
def echo(text):
    return text
M.run(port=%d, host='127.0.0.1')
'''
LISTENER_BARE = '''
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', %d))
s.listen()
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\n["hi"]')
'''
REQUEST = (b'POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
           b'Content-Length: 45\r\n\r\n{"args": ["hi"], "kwargs": {}, "token": null}')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def environment(folder):
    env = dict(os.environ, PYTHONPATH=folder)
    env.pop('PYTHONDONTWRITEBYTECODE', None)
    env.pop('PYTHONPYCACHEPREFIX', None)
    return env


def import_ms(folder, cached, bare=False):
    flags = [] if cached else ['-B']
    out = subprocess.run([sys.executable] + flags + ['-c', IMPORT_BARE if bare else IMPORT],
                         cwd=folder, env=environment(folder), capture_output=True, text=True,
                         check=True)
    return float(out.stdout)


def first_answer(folder, cached, bare=False):
    """(ms from spawn to the first answer, idle RSS in MB)."""
    port = free_port()
    flags = [] if cached else ['-B']
    code = (LISTENER_BARE if bare else LISTENER) % port
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable] + flags + ['-c', code], cwd=folder,
                            env=environment(folder), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = start + 10
        while True:
            try:
                sock = socket.create_connection(('127.0.0.1', port), 1)
                break
            except OSError:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.0005)
        with sock:
            sock.sendall(REQUEST)
            answer = sock.recv(65536)
            elapsed = (time.perf_counter() - start) * 1000
        assert answer.startswith(b'HTTP/1.1 200'), answer
        time.sleep(0.5)
        with open('/proc/%d/status' % proc.pid) as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith('VmRSS'))
        return elapsed, rss / 1024
    finally:
        proc.terminate()
        proc.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=7)
    options = parser.parse_args()
    cached = tempfile.mkdtemp(prefix='mc-cached-')
    uncached = tempfile.mkdtemp(prefix='mc-uncached-')
    try:
        for folder in (cached, uncached):
            shutil.copy(os.path.join(ROOT, 'mconnector.py'), folder)
        subprocess.run([sys.executable, '-c', 'import mconnector'], cwd=cached,
                       env=environment(cached), check=True)
        assert os.path.isdir(os.path.join(cached, '__pycache__'))
        rows = {}
        for _ in range(options.runs):       # rows take turns in each run
            for bytecode, folder in (('cached', cached), ('uncached', uncached)):
                is_cached = bytecode == 'cached'
                rows.setdefault(('import mconnector', bytecode), []).append(
                    (import_ms(folder, is_cached), import_ms(folder, is_cached, True)))
                mine = first_answer(folder, is_cached)
                bare = first_answer(folder, is_cached, True)
                rows.setdefault(('start to first answer', bytecode), []).append(
                    (mine[0], bare[0]))
                rows.setdefault(('idle listener RSS', bytecode), []).append((mine[1], bare[1]))
        assert not os.path.exists(os.path.join(uncached, '__pycache__'))
    finally:
        shutil.rmtree(cached)
        shutil.rmtree(uncached)
    goals = {('import mconnector', 'cached'): (30, 'ms'),
             ('import mconnector', 'uncached'): (70, 'ms'),
             ('start to first answer', 'cached'): (100, 'ms'),
             ('start to first answer', 'uncached'): (150, 'ms'),
             ('idle listener RSS', 'cached'): (18, 'MB'),
             ('idle listener RSS', 'uncached'): (18, 'MB')}

    def median(values):
        return sorted(values)[len(values) // 2]
    print('%-24s %-9s %12s %12s %8s %6s' % ('', 'bytecode', 'mconnector', 'bare python',
                                            'goal', 'met'))
    for (what, bytecode), values in rows.items():
        mine, bare = median([m for m, _ in values]), median([b for _, b in values])
        goal, unit = goals[what, bytecode]
        print('%-24s %-9s %9.1f %-2s %9.1f %-2s %5d %-2s %6s' % (
            what, bytecode, mine, unit, bare, unit, goal, unit, 'yes' if mine <= goal else 'no'))
    print('(median of %d runs; bare python: no import for the import row, a socket-module '
          'listener for the others)' % options.runs)


if __name__ == '__main__':
    main()
