"""Build script: the Python package, and (later) the compiled extension sn_kernels._C."""
from setuptools import setup

setup()
