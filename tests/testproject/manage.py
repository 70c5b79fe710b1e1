#!/usr/bin/env python
"""A minimal project run by tests/test_django_runner.py through Django's test runner."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
