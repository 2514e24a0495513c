"""The 0.3.7 tutorial's "Option 2": run app1's listener from a separate file."""
from app1 import Micro

if __name__ == '__main__':
    Micro.run(port=5000, host='0.0.0.0', debug=True)
