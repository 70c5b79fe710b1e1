"""Django's MySQL backend on PyMySQL with greenpatch's connection pool.

For projects that prefer a setting to patching::

    DATABASES = {"default": {"ENGINE": "greenpatch.django.mysql", ...,
                             "OPTIONS": {"pool": {"max_size": 20}}}}

Pool options are those of ``greenpatch.django.pooling.POOL_DEFAULTS``.
Cooperative I/O and greenlet-local connections still come from
`greenpatch.patch_all`; this backend alone only adds the pool.
"""

from __future__ import annotations

import sys

if "MySQLdb" not in sys.modules:
    import pymysql

    pymysql.install_as_MySQLdb()

from django.db.backends.mysql import base as _mysql  # noqa: E402

from greenpatch.django import pooling  # noqa: E402


class DatabaseWrapper(_mysql.DatabaseWrapper):
    # Tells a patched stock backend (patches/django_mysql.py) not to pool again.
    greenpatch_pooled_engine = True

    def get_connection_params(self):
        return pooling.get_connection_params(self, super().get_connection_params)

    def get_new_connection(self, conn_params):
        return pooling.get_new_connection(self, super().get_new_connection, conn_params)

    def init_connection_state(self):
        return pooling.init_connection_state(self, super().init_connection_state)

    def _close(self):
        return pooling.close(self, super()._close)

    def close_if_health_check_failed(self):
        return pooling.close_if_health_check_failed(self, super().close_if_health_check_failed)

    mysql_server_data = pooling.CachedServerData(_mysql.DatabaseWrapper.__dict__["mysql_server_data"])
