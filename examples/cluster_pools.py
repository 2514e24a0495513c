"""Ordered work per key on a cluster engine: dask.distributed, and Ray through a small adapter.

    python examples/cluster_pools.py            # each engine that is installed; others skipped

KeyedExecutor takes any executor with a `submit` that returns concurrent.futures-style
futures.  A dask.distributed Client is one as it is.  Ray has no such executor, so
RayExecutor below is the adapter: it runs each task as a Ray remote function and hands back
the Future that Ray's ObjectRef gives.  Either way, the tasks of one key run one after
another in submission order, and tasks of different keys run in parallel on the cluster.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from mconnector import KeyedExecutor  # noqa: E402


def step(key, n):
    """A task that records where in its key's sequence it ran."""
    return key, n


class RayExecutor:
    """The adapter that lets KeyedExecutor run tasks on Ray."""

    def __init__(self, **options):
        import ray
        self._ray = ray
        ray.init(**options)
        self._call = ray.remote(lambda fn, args, kwargs: fn(*args, **kwargs))

    def submit(self, fn, *args, **kwargs):
        return self._call.remote(fn, args, kwargs).future()

    def shutdown(self, wait=True):
        self._ray.shutdown()


def run(pool, name):
    futures = [pool.submit_id(n % 4, step, n % 4, n) for n in range(40)]
    results = [future.result(60) for future in futures]
    pool.shutdown()
    for key in range(4):
        order = [n for k, n in results if k == key]
        assert order == list(range(key, 40, 4)), order
    print('%s: 40 tasks over 4 keys, each key in order' % name)


def main():
    ran = 0
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        print('dask.distributed: not installed, skipped (pip install dask distributed)')
    else:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                               dashboard_address=None)
        run(KeyedExecutor(Client(cluster)), 'dask.distributed')
        cluster.close()
        ran += 1
    try:
        import ray  # noqa: F401
    except ImportError:
        print('ray: not installed, skipped (pip install ray)')
    else:
        run(KeyedExecutor(RayExecutor(num_cpus=2, include_dashboard=False)), 'ray')
        ran += 1
    return ran


if __name__ == '__main__':
    main()
