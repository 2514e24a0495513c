"""The listener's own cost per call, without any I/O: Microservice.handle() in a loop.

    python bench/bench_handle.py [--calls N] [--rounds R] [--against OTHER/mconnector.py]

What every server shell (built-in, WSGI) calls for each request: routing, decoding the
arguments, calling the function, encoding the answer, and the /_mc/metrics counters.
With --against, an earlier mconnector.py is measured in the same run (each in its own
process, taking turns), to show what a change costs in ratio terms.
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

MEASURE = r'''
import sys, time
import mconnector
M = mconnector.Microservice('bench')

@M.typing('/hello')
@M.reply
def hello(name):
    return 'Welcome %s' % name
headers = {'content-type': 'application/json', 'content-length': '40'}
body = b'{"args": ["x"], "kwargs": {}, "token": null}'
handle = M.handle
calls = int(sys.argv[1])
for _ in range(1000):
    handle('POST', '/hello', headers, body)
start = time.perf_counter()
for _ in range(calls):
    handle('POST', '/hello', headers, body)
print((time.perf_counter() - start) / calls * 1e6)
'''


def measure(module_dir, calls):
    out = subprocess.run([sys.executable, '-c', MEASURE, str(calls)], cwd=module_dir,
                         env=dict(os.environ, PYTHONPATH=module_dir), check=True,
                         capture_output=True, text=True)
    return float(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--calls', type=int, default=20000, help='calls per round and row')
    parser.add_argument('--rounds', type=int, default=7, help='rounds (the median is shown)')
    parser.add_argument('--against', metavar='PATH', help='another mconnector.py to compare')
    options = parser.parse_args()
    rows = [('mconnector', os.path.dirname(HERE))]
    if options.against:
        rows.append(('mconnector at ' + options.against,
                     os.path.dirname(os.path.abspath(options.against))))
    results = {name: [] for name, _ in rows}
    for _ in range(options.rounds):
        for name, module_dir in rows:
            results[name].append(measure(module_dir, options.calls))
    median = {name: sorted(values)[len(values) // 2] for name, values in results.items()}
    base = median['mconnector']
    print('%-44s %12s %8s' % ('Microservice.handle(), no I/O', 'us per call', 'ratio'))
    for name, _ in rows:
        print('%-44s %12.2f %7.2fx' % (name, median[name], median[name] / base))
    print('(median of %d rounds of %d calls, each round in fresh processes taking turns)'
          % (options.rounds, options.calls))


if __name__ == '__main__':
    main()
