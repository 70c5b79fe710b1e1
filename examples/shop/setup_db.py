#!/usr/bin/env python
"""Create the shop's database if it is missing (or drop it with ``--drop``).

    python examples/shop/setup_db.py            # then: manage.py migrate, manage.py seed

Reads ``SHOP_DB_URL`` like the settings (default
``mysql://root@127.0.0.1:3306/greenpatch_shop``) and connects without a
database name, with plain PyMySQL: no Django, no greenpatch needed.
"""

from __future__ import annotations

import argparse
import sys

import pymysql

from shop_project import dburl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=dburl.db_url(), help="database URL (default: $SHOP_DB_URL)")
    parser.add_argument("--drop", action="store_true", help="drop the database instead")
    opts = parser.parse_args(argv)
    try:
        db = dburl.parse(opts.url)
    except ValueError as exc:
        parser.error(str(exc))
    name = db.pop("name")
    where = f"{db['user']}@{db['host']}:{db['port']}"
    try:
        conn = pymysql.connect(**db)
    except pymysql.err.OperationalError as exc:
        print(f"setup_db: cannot connect to {where}: {exc}", file=sys.stderr)
        return 1
    try:
        with conn.cursor() as cur:
            exists = bool(cur.execute("SHOW DATABASES LIKE %s", [name.replace("_", r"\_")]))
            if opts.drop:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
                print(f"database {name} {'dropped' if exists else 'did not exist'} on {where}")
            elif exists:
                print(f"database {name} already exists on {where}")
            else:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
                print(f"database {name} created on {where}")
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
