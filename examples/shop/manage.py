#!/usr/bin/env python
"""Django's command-line utility for the greenpatch shop demo.

Works both as ``python examples/shop/manage.py ...`` and as
``python -m greenpatch examples/shop/manage.py ...``: it calls
``greenpatch.patch_all()`` itself (idempotent, and a no-op under
``GREENPATCH=0``) before Django is imported.
"""

import os
import sys


def main() -> None:
    import greenpatch

    greenpatch.patch_all()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
