"""The 0.3.7 tutorial's chapter 8 example, unchanged but for the lines that find mconnector.

    python examples/pools.py

Every id's items are printed in the order they were submitted.
"""
import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import DistributedThreads, DistributedProcess, Worker
import random
import time
import queue
import threading
import multiprocessing

def wait_on_b(b):
    time.sleep(random.random())
    # b will never complete because it is waiting on a.
    print('working on b=%s' % b)
    return 'working on b=%s' % b
    # return 5


def wait_on_a(a):
    time.sleep(1)
    # a will never complete because it is waiting on b.
    return 'working on a=%s' % a
    # return 6

# example data
poll = [
    {'id': 1, 'x': 'Nguyen'},
    {'id': 1, 'x': 'Minh'},
    {'id': 1, 'x': 'Tuan'},
    {'id': 2, 'x': 'Vu'},
    {'id': 3, 'x': 'Ai do khac'},
    {'id': 2, 'x': 'Kim'},
    {'id': 2, 'x': 'Oanh'},
    {'id': 4, 'x': '1'},
    {'id': 4, 'x': '2'},
    {'id': 4, 'x': '3'},
    {'id': 4, 'x': '4'},
    {'id': 4, 'x': '5'},
    {'id': 4, 'x': '6'},
    {'id': 4, 'x': '7'},
    {'id': 4, 'x': '8'},
    {'id': 5, 'x': '101'},
    {'id': 5, 'x': '102'},
    {'id': 5, 'x': '103'},
    {'id': 5, 'x': '104'},
    {'id': 5, 'x': '105'},
    {'id': 6, 'x': 'Test watching'},
    {'id': 6, 'x': 'Test watching'},
    {'id': 7, 'x': 'Test watching'},
    {'id': 8, 'x': 'Test watching'},
    {'id': 9, 'x': 'Test watching'},
    {'id': 10, 'x': 'Test watching'},
    {'id': 11, 'x': 'Test watching'},
    {'id': 12, 'x': 'Test watching'},
    {'id': 13, 'x': 'Test watching'},
    {'id': 14, 'x': 'Test watching'},
    {'id': 15, 'x': 'Test watching'},
    {'id': 16, 'x': 'Test watching'},
    {'id': 17, 'x': 'Test watching'},
    {'id': 18, 'x': 'Test watching'},
    {'id': 19, 'x': 'Test watching'},
    {'id': 20, 'x': 'Test watching'},
    {'id': 21, 'x': 'Test watching'},
    {'id': 22, 'x': 'Test watching'},
]
def main():
    start = time.time()

    thread_out_queue = queue.Queue()
    pool = DistributedThreads(
        max_workers=4, max_watching=100, out_queue=thread_out_queue)
    for item in poll:
        pool.submit_id(item['id'], wait_on_a, item)
    t = Worker(thread_out_queue, print)
    t.daemon = True
    t.start()
    pool.shutdown()
    print('Finish after: ', time.time()-start, 'seconds')

    print("========= End of threads ==============")

    process_out_queue = multiprocessing.Queue()
    pool2 = DistributedProcess(
        max_workers=4, max_watching=100, out_queue=process_out_queue)
    for item in poll:
        pool2.submit_id(item['id'], wait_on_b, item)
    pool2.shutdown()

    print('Finish after: ', time.time()-start, 'seconds')


if __name__ == '__main__':
    main()
