"""
The sans-io core: plain functions and state machines, no trio, os, socket or subprocess.

`tests/test_core_is_pure.py` enforces the rule by parsing every module here.
"""
