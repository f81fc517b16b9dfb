"""Tests of lorakit.training (a package so that this folder's conftest does not shadow tests/conftest.py)."""
