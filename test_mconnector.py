"""Tests for mconnector: real listeners on loopback (port 0), real senders, real bytes.

Run with:  python -m unittest -v test_mconnector
"""

import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
import unittest

import mconnector


HERE = os.path.dirname(os.path.abspath(__file__))


def wait_for(predicate, timeout=5.0, interval=0.005):
    """Poll `predicate` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ==========================================================================================
# Routing
# ==========================================================================================


class RuleTest(unittest.TestCase):
    def test_sanic_and_flask_styles(self):
        r = mconnector.Rule('/item/<id:int>/<int:x>/<name>/<p:path>')
        self.assertEqual(r.match('/item/3/-4/bob/a/b'), {'id': 3, 'x': -4, 'name': 'bob', 'p': 'a/b'})
        self.assertIsNone(r.match('/item/x/4/bob/a'))

    def test_typed_parameters(self):
        self.assertEqual(mconnector.Rule('/n/<v:number>').match('/n/2.5'), {'v': 2.5})
        self.assertIsNone(mconnector.Rule('/a/<v:alpha>').match('/a/ab1'))
        u = '12345678-1234-1234-1234-123456789abc'
        import uuid
        self.assertEqual(mconnector.Rule('/u/<v:uuid>').match('/u/' + u), {'v': uuid.UUID(u)})
        self.assertEqual(mconnector.Rule('/r/<c:[a-z]{3}>').match('/r/abc'), {'c': 'abc'})
        self.assertIsNone(mconnector.Rule('/r/<c:[a-z]{3}>').match('/r/abcd'))

    def test_bad_rules(self):
        for bad in ('nope', '/x/<1a>', '/x/<a>/<a>', '/x/<a:(b)>', '/x/<a:[>'):
            with self.assertRaises(mconnector.RouteError, msg=bad):
                mconnector.Rule(bad)


# ==========================================================================================
# Values, HTTP, listener, sender, command line (issue 2)
# ==========================================================================================

# (core tests)


# ==========================================================================================
# WebSocket (issue 4)
# ==========================================================================================

# (websocket tests)


# ==========================================================================================
# Pools (issue 3)
# ==========================================================================================

# Imported here rather than at the top so that this section merges on its own.
import concurrent.futures  # noqa: E402


# Tasks for the process pools must be importable by name from a module.

def _timed_task(key, seq, pause):
    start = time.monotonic()
    if pause:
        time.sleep(pause)
    return key, seq, start, time.monotonic(), os.getpid()


def _kwargs_task(a, b=0, *, key=None, fn=None, f=None):
    return a, b, key, fn, f


def _failing_task(key, seq):
    if seq % 3 == 1:
        raise ValueError('task %s/%s fails' % (key, seq))
    return key, seq


class _InlineExecutor(concurrent.futures.Executor):
    """A real, if minimal, third-party Executor: runs each task inside submit()."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _drain(q, count, timeout=10.0):
    """Take `count` items from a queue.Queue or multiprocessing.Queue."""
    deadline = time.monotonic() + timeout
    return [q.get(timeout=max(0.0, deadline - time.monotonic())) for _ in range(count)]


def _per_key(pairs):
    """[(key, seq), ...] -> {key: [seq, ...]} in the order given."""
    out = {}
    for key, seq in pairs:
        out.setdefault(key, []).append(seq)
    return out


class _OrderProbe:
    """Records, for thread tasks, the order they ran in per key and any overlap in a key."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = set()
        self.ran = {}
        self.overlaps = []

    def task(self, key, seq, pause):
        with self.lock:
            if key in self.running:
                self.overlaps.append((key, seq))
            self.running.add(key)
        if pause:
            time.sleep(pause)
        with self.lock:
            self.running.discard(key)
            self.ran.setdefault(key, []).append(seq)
        return key, seq


def _workload(tasks, keys, max_pause, seed):
    rng = random.Random(seed)
    counters = {}
    out = []
    for _ in range(tasks):
        key = 'k%d' % rng.randrange(keys)
        seq = counters[key] = counters.get(key, -1) + 1
        pause = rng.random() * max_pause if rng.random() < 0.3 else 0
        out.append((key, seq, pause))
    return out


class ThreadPoolOrderTest(unittest.TestCase):
    def test_order_per_key_many_keys_random_durations(self):
        probe = _OrderProbe()
        out = queue.Queue()
        work = _workload(3000, 60, 0.0005, seed=1)
        with mconnector.DistributedThreads(out_queue=out, max_workers=8,
                                           max_watching=500) as pool:
            futures = [pool.submit_id(key, probe.task, key, seq, pause)
                       for key, seq, pause in work]
        self.assertEqual(probe.overlaps, [])
        expected = _per_key((key, seq) for key, seq, _ in work)
        self.assertEqual(probe.ran, expected)
        self.assertEqual([f.result() for f in futures], [(k, s) for k, s, _ in work])
        self.assertEqual(_per_key(out.get_nowait() for _ in range(len(work))), expected)
        self.assertTrue(out.empty())
        self.assertEqual(pool.pending, 0)
        self.assertEqual(pool.busy_keys, 0)

    def test_unkeyed_tasks_all_run(self):
        with mconnector.DistributedThreads(max_workers=4) as pool:
            futures = [pool.submit(pow, i, 2) for i in range(500)]
            futures.append(pool.submit_id(None, pow, 3, 3))
        self.assertEqual([f.result() for f in futures], [i * i for i in range(500)] + [27])

    def test_keyword_arguments_arrive(self):
        with mconnector.DistributedThreads() as pool:
            # Even those named like submit_id's own parameters.
            f1 = pool.submit_id('k', _kwargs_task, 1, b=2, key='K', fn='F', f='f')
            f2 = pool.submit(_kwargs_task, a=5, key=7)
        self.assertEqual(f1.result(), (1, 2, 'K', 'F', 'f'))
        self.assertEqual(f2.result(), (5, 0, 7, None, None))

    def test_exceptions_land_in_futures_and_out_queue_and_key_goes_on(self):
        out = queue.Queue()
        with mconnector.DistributedThreads(out_queue=out, max_workers=3) as pool:
            futures = [pool.submit_id(key, _failing_task, key, seq)
                       for seq in range(9) for key in ('a', 'b')]
        outcomes = [out.get_nowait() for _ in futures]
        for i, f in enumerate(futures):
            if (i // 2) % 3 == 1:
                self.assertIsInstance(f.exception(), ValueError)
            else:
                self.assertEqual(f.result(), (('a', 'b')[i % 2], i // 2))
        per_key = {}
        for item in outcomes:
            if isinstance(item, ValueError):
                key, seq = str(item).split()[1].split('/')
                per_key.setdefault(key, []).append(('error', int(seq)))
            else:
                per_key.setdefault(item[0], []).append(('ok', item[1]))
        expected = [('error' if s % 3 == 1 else 'ok', s) for s in range(9)]
        self.assertEqual(per_key, {'a': expected, 'b': expected})

    def test_keys_are_forgotten(self):
        with mconnector.DistributedThreads(max_workers=4, max_watching=0) as pool:
            for i in range(2000):
                pool.submit_id(('row', i), abs, -i)
        self.assertEqual(pool.busy_keys, 0)
        self.assertEqual(pool._queues, {})

    def test_unhashable_key(self):
        with mconnector.DistributedThreads() as pool:
            with self.assertRaises(TypeError):
                pool.submit_id(['a'], abs, 1)
            self.assertEqual(pool.pending, 0)


class PoolLifecycleTest(unittest.TestCase):
    def test_shutdown_waits_for_every_task(self):
        gate = threading.Event()
        pool = mconnector.DistributedThreads(max_workers=2)
        try:
            futures = [pool.submit_id(i % 3, gate.wait, 5) for i in range(12)]
            closer = threading.Thread(target=pool.shutdown)
            closer.start()
            closer.join(0.05)
            self.assertTrue(closer.is_alive(), 'shutdown returned with tasks pending')
            with self.assertRaises(mconnector.PoolClosed):
                pool.submit(abs, 1)
            gate.set()
            closer.join(5)
            self.assertFalse(closer.is_alive())
            self.assertTrue(all(f.done() and f.result() is True for f in futures))
            self.assertEqual(pool.pending, 0)
        finally:
            gate.set()
            pool.shutdown()

    def test_submit_after_shutdown_is_a_runtime_error(self):
        pool = mconnector.DistributedThreads()
        pool.shutdown()
        pool.shutdown()         # harmless
        with self.assertRaises(RuntimeError):
            pool.submit_id(1, abs, 1)

    def test_backpressure_blocks_and_releases(self):
        gate = threading.Event()
        with mconnector.DistributedThreads(max_workers=2, max_watching=3) as pool:
            try:
                for i in range(3):
                    pool.submit_id(i, gate.wait, 5)
                self.assertEqual(pool.pending, 3)
                fourth = []
                submitter = threading.Thread(
                    target=lambda: fourth.append(pool.submit_id('x', abs, -4)))
                submitter.start()
                submitter.join(0.05)
                self.assertTrue(submitter.is_alive(), 'submit did not block at max_watching')
                self.assertEqual(pool.pending, 3)
                gate.set()
                submitter.join(5)
                self.assertFalse(submitter.is_alive())
                self.assertEqual(fourth[0].result(5), 4)
            finally:
                gate.set()

    def test_blocked_submit_raises_when_the_pool_shuts_down(self):
        gate = threading.Event()
        pool = mconnector.DistributedThreads(max_workers=1, max_watching=1)
        try:
            pool.submit(gate.wait, 5)
            errors = []

            def submit():
                try:
                    pool.submit(abs, 1)
                except mconnector.PoolClosed as exc:
                    errors.append(exc)

            submitter = threading.Thread(target=submit)
            submitter.start()
            self.assertTrue(wait_for(lambda: pool._space_waiters == 1))
            pool.shutdown(wait=False)
            submitter.join(5)
            self.assertEqual(len(errors), 1)
        finally:
            gate.set()
            pool.shutdown()

    def test_cancel_futures_and_cancelled_tasks_keep_the_key_moving(self):
        gate = threading.Event()
        pool = mconnector.DistributedThreads(max_workers=2)
        try:
            first = pool.submit_id('k', gate.wait, 5)
            second = pool.submit_id('k', abs, -2)
            third = pool.submit_id('k', abs, -3)
            self.assertTrue(second.cancel())        # waiting behind its key: cancellable
            queued = [pool.submit_id('k', abs, -i) for i in range(5)]
            pool.shutdown(wait=False, cancel_futures=True)
            self.assertTrue(all(f.cancelled() for f in queued + [third]))
            gate.set()
            self.assertIs(first.result(5), True)
            pool.shutdown()
            self.assertEqual(pool.busy_keys, 0)
        finally:
            gate.set()
            pool.shutdown()

    def test_any_executor_even_an_inline_one(self):
        # A long queue behind one key drains without recursion, in order, in the settler.
        gate = threading.Event()
        ran = []
        with mconnector.KeyedExecutor(_InlineExecutor()) as pool:
            holder = threading.Thread(target=pool.submit_id, args=('k', gate.wait, 5))
            holder.start()
            self.assertTrue(wait_for(lambda: pool.pending == 1))
            futures = [pool.submit_id('k', ran.append, i) for i in range(3000)]
            gate.set()
            holder.join(5)
        self.assertEqual(ran, list(range(3000)))
        self.assertTrue(all(f.done() for f in futures))

    def test_executor_that_refuses_fails_the_futures(self):
        executor = concurrent.futures.ThreadPoolExecutor(1)
        executor.shutdown()
        out = queue.Queue()
        with mconnector.KeyedExecutor(executor, out_queue=out) as pool:
            futures = [pool.submit_id('k', abs, -i) for i in range(3)] + [pool.submit(abs, 1)]
        for f in futures:
            self.assertIsInstance(f.exception(), RuntimeError)
        self.assertEqual(out.qsize(), 4)

    def test_compat_arguments(self):
        with self.assertWarns(DeprecationWarning):
            pool = mconnector.DistributedThreads(worker=object, maxsize=5, delay=0.1)
        pool.shutdown()

    def test_import_stays_cheap(self):
        code = ('import sys, mconnector; '
                'print([m for m in ("concurrent.futures", "multiprocessing", "pickle") '
                'if m in sys.modules])')
        out = subprocess.run([sys.executable, '-c', code], cwd=HERE, check=True,
                             capture_output=True, text=True).stdout
        self.assertEqual(out.strip(), '[]')


class WorkerTest(unittest.TestCase):
    def test_worker_calls_f_survives_errors_and_stops(self):
        q = queue.Queue()
        seen = []

        def f(item):
            if item == 'bad':
                raise ValueError(item)
            seen.append(item)

        worker = mconnector.Worker(q, f)
        self.assertTrue(worker.daemon)
        with self.assertLogs('mconnector', 'ERROR'):
            worker.start()
            for item in (1, 'bad', 2):
                q.put(item)
            q.join()            # task_done() is called for every item
        worker.stop()
        worker.join(5)
        self.assertFalse(worker.is_alive())
        self.assertEqual(seen, [1, 2])


# The seed's chapter-8 data, and its flow with tiny durations.
SEED_POLL = (
    [(1, 'Nguyen'), (1, 'Minh'), (1, 'Tuan'), (2, 'Vu'), (3, 'Ai do khac'), (2, 'Kim'),
     (2, 'Oanh')] + [(4, str(i)) for i in range(1, 9)] + [(5, str(i)) for i in range(101, 106)]
    + [(6, 'Test watching')] + [(i, 'Test watching') for i in range(6, 23)])


def _seed_wait_on_b(b):
    time.sleep(random.random() * 0.002)
    return 'working on b=%s' % b


def _seed_wait_on_a(a):
    time.sleep(random.random() * 0.002)
    return 'working on a=%s' % a


class ProcessPoolTest(unittest.TestCase):
    """One process pool for all of these: starting one costs time."""

    @classmethod
    def setUpClass(cls):
        cls.out = queue.Queue()
        cls.pool = mconnector.DistributedProcess(out_queue=cls.out, max_workers=4,
                                                 max_watching=200)

    @classmethod
    def tearDownClass(cls):
        cls.pool.shutdown()

    def setUp(self):
        self.assertEqual(self.pool.pending, 0)
        while not self.out.empty():
            self.out.get_nowait()

    def test_order_per_key_with_processes(self):
        work = _workload(2000, 40, 0.0005, seed=2)
        futures = [self.pool.submit_id(key, _timed_task, key, seq, pause)
                   for key, seq, pause in work]
        results = [f.result(30) for f in futures]
        runs = {}
        for key, seq, start, end, pid in results:
            runs.setdefault(key, []).append((seq, start, end))
        for key, run in runs.items():
            self.assertEqual([seq for seq, _, _ in run], list(range(len(run))))
            for (_, _, end), (seq, start, _) in zip(run, run[1:]):
                self.assertLessEqual(end, start, 'key %s task %d overlapped' % (key, seq))
        self.assertGreater(len({r[4] for r in results}), 1, 'only one process worked')
        outcomes = _drain(self.out, len(work))
        self.assertEqual(_per_key((r[0], r[1]) for r in outcomes),
                         _per_key((key, seq) for key, seq, _ in work))

    def test_kwargs_exceptions_and_unpicklable_tasks(self):
        ok = self.pool.submit_id('k', _kwargs_task, 1, b=2, key='K', f='f')
        bad = self.pool.submit_id('k', lambda: 1)
        self.assertIsInstance(bad.exception(0), mconnector.TaskNotPicklable)
        self.assertIn('lambda', str(bad.exception()))
        unpicklable_arg = self.pool.submit_id('k', _kwargs_task, threading.Lock())
        self.assertIsInstance(unpicklable_arg.exception(0), mconnector.TaskNotPicklable)
        failing = [self.pool.submit_id('k', _failing_task, 'k', seq) for seq in range(3)]
        self.assertEqual(ok.result(10), (1, 2, 'K', None, 'f'))
        self.assertEqual(failing[0].result(10), ('k', 0))
        self.assertIsInstance(failing[1].exception(10), ValueError)
        self.assertEqual(failing[2].result(10), ('k', 2))
        outcomes = _drain(self.out, 6)
        self.assertEqual(sum(isinstance(o, mconnector.TaskNotPicklable) for o in outcomes), 2)
        rest = [o for o in outcomes if not isinstance(o, mconnector.TaskNotPicklable)]
        self.assertEqual(rest[0], (1, 2, 'K', None, 'f'))
        self.assertEqual(rest[1:2], [('k', 0)])
        self.assertIsInstance(rest[2], ValueError)
        self.assertEqual(rest[3], ('k', 2))


class SeedExampleTest(unittest.TestCase):
    """The seed's chapter-8 flow: every id's items come out in submission order."""

    def expected(self, prefix):
        return _per_key((i, '%s=%r' % (prefix, {'id': i, 'x': x})) for i, x in SEED_POLL)

    def by_id(self, lines):
        out = {}
        for line in lines:
            item = eval(line.split('=', 1)[1])      # the dict's repr, as the seed prints it
            out.setdefault(item['id'], []).append(line)
        return out

    def test_threads_with_worker(self):
        poll = [{'id': i, 'x': x} for i, x in SEED_POLL]
        thread_out_queue = queue.Queue()
        printed = []
        pool = mconnector.DistributedThreads(max_workers=4, max_watching=100,
                                             out_queue=thread_out_queue)
        for item in poll:
            pool.submit_id(item['id'], _seed_wait_on_a, item)
        t = mconnector.Worker(thread_out_queue, printed.append)
        t.daemon = True
        t.start()
        pool.shutdown()
        thread_out_queue.join()
        t.stop()
        t.join(5)
        self.assertEqual(self.by_id(printed), self.expected('working on a'))

    def test_processes_with_multiprocessing_queue(self):
        import multiprocessing
        poll = [{'id': i, 'x': x} for i, x in SEED_POLL]
        process_out_queue = multiprocessing.Queue()
        pool2 = mconnector.DistributedProcess(max_workers=4, max_watching=100,
                                              out_queue=process_out_queue)
        for item in poll:
            pool2.submit_id(item['id'], _seed_wait_on_b, item)
        pool2.shutdown()
        lines = _drain(process_out_queue, len(poll))
        process_out_queue.close()
        process_out_queue.join_thread()
        self.assertEqual(self.by_id(lines), self.expected('working on b'))


if __name__ == '__main__':
    unittest.main()
