import os, sys  # the checkout's mconnector.py, one folder up: a project holds its own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mconnector import Friend

aFriend= Friend('app1', 'http://0.0.0.0:5000')
message = aFriend.send('/helloworld','Mr. Developer')
print(message)
