import os
import sys

# The project is a flat folder of modules; tests import them from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
