"""Test guest for the 9p proxy helper: see vm.py."""
