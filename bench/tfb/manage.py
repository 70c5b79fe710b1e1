#!/usr/bin/env python
"""Django's manage.py for the benchmark app (``runserver`` is one of the peers)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tfb.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
