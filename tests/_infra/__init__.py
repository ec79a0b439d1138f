"""The test suite's infrastructure (a pytest plugin package; see README.md beside this file)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository's root folder."""
