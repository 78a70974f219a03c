"""Build hook for the native extension in csrc/ (ditengine._C).

Package metadata lives in pyproject.toml. No native ops exist yet, so this builds nothing; when csrc/
gains sources, they are compiled here with torch.utils.cpp_extension.
"""
from setuptools import setup

setup()
