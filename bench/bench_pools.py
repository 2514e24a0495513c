"""Pool benchmark: per-task cost of the keyed pools beside a bare ThreadPoolExecutor.

    python bench/bench_pools.py [--tasks 20000] [--keys 100] [--workers 4] [--repeat 3]

Every row runs the same no-op tasks on `workers` threads, in one run of this script, so the
ratio column compares like with like on this machine.  The bare executor gets the tasks
without keys (it cannot order them); the keyed rows spread them over `keys` keys and keep
per-key order.  The 0.3.7 package's DistributedThreads is measured too when it is installed
(it sleeps between polls, so expect milliseconds per task); otherwise its row is
skipped.
Times are the best of `repeat` interleaved rounds, from the first submit until every task
has finished (the pool's shutdown included).
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mconnector  # noqa: E402


def noop(i):
    return i


def run_bare(tasks, keys, workers):
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        futures = [ex.submit(noop, i) for i in range(tasks)]
    elapsed = time.perf_counter() - start
    wait(futures)
    return elapsed


def run_keyed(make_pool):
    def run(tasks, keys, workers):
        pool = make_pool(workers)
        start = time.perf_counter()
        with pool:
            for i in range(tasks):
                pool.submit_id(i % keys, noop, i)
        return time.perf_counter() - start
    return run


def run_keyed_out_queue(tasks, keys, workers):
    import queue
    out = queue.Queue()
    pool = mconnector.DistributedThreads(out_queue=out, max_workers=workers)
    start = time.perf_counter()
    with pool:
        for i in range(tasks):
            pool.submit_id(i % keys, noop, i)
    elapsed = time.perf_counter() - start
    assert out.qsize() == tasks
    return elapsed


def run_old_package(tasks, keys, workers):
    from microservices_connector.spawn import DistributedThreads
    pool = DistributedThreads(max_workers=workers, max_watching=100)
    start = time.perf_counter()
    for i in range(tasks):
        pool.submit_id(i % keys, noop, i)
    pool.shutdown()
    return time.perf_counter() - start


def old_package_installed():
    try:
        import microservices_connector.spawn  # noqa: F401
    except Exception:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tasks', type=int, default=20000)
    parser.add_argument('--keys', type=int, default=100)
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--repeat', type=int, default=5)
    args = parser.parse_args(argv)

    rows = [
        ('ThreadPoolExecutor, no keys (baseline)', run_bare),
        ('DistributedThreads (max_watching=100)',
         run_keyed(lambda w: mconnector.DistributedThreads(max_workers=w))),
        ('DistributedThreads (max_watching=0)',
         run_keyed(lambda w: mconnector.DistributedThreads(max_workers=w, max_watching=0))),
        ('DistributedThreads + out_queue', run_keyed_out_queue),
        ('KeyedExecutor(ThreadPoolExecutor)',
         run_keyed(lambda w: mconnector.KeyedExecutor(ThreadPoolExecutor(w)))),
    ]
    if old_package_installed():
        rows.append(('microservices-connector 0.3.7 DistributedThreads', run_old_package))

    print('%d no-op tasks, %d keys, %d workers, best of %d interleaved rounds, Python %s'
          % (args.tasks, args.keys, args.workers, args.repeat, sys.version.split()[0]))
    # Rounds interleave the rows so that a burst of load on the machine hits them alike.
    best = [float('inf')] * len(rows)
    for _ in range(args.repeat):
        for i, (name, run) in enumerate(rows):
            best[i] = min(best[i], run(args.tasks, args.keys, args.workers))
    print('%-50s %12s %8s' % ('pool', 'us/task', 'ratio'))
    baseline = best[0] / args.tasks * 1e6
    for (name, run), elapsed in zip(rows, best):
        per_task = elapsed / args.tasks * 1e6
        print('%-50s %12.1f %8.2f' % (name, per_task, per_task / baseline))
    if not old_package_installed():
        print('(microservices-connector 0.3.7 not installed: its row is skipped)')


if __name__ == '__main__':
    main()
