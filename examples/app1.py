import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import Microservice

Micro = Microservice(__name__)

@Micro.typing('/helloworld')
@Micro.reply
def helloworld(name):
    return 'Welcome %s' % (name)

if __name__ == '__main__':
    Micro.run()
