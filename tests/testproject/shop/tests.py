import asyncio
from unittest import skipUnless

from django.db import connection
from django.test import TestCase, TransactionTestCase
from tornado.ioloop import IOLoop

import greenpatch

from .models import Item


class ItemTests(TestCase):
    def test_create_and_count(self):
        Item.objects.create(name="a")
        self.assertEqual(Item.objects.count(), 1)
        self.assertTrue(connection.settings_dict["NAME"].startswith("test_"))


@skipUnless("django_db" in greenpatch.patched(), "needs greenpatch.patch_all()")
class GreenTests(TransactionTestCase):
    def test_workers_share_the_test_database(self):
        Item.objects.create(name="b")

        async def main():
            return await asyncio.gather(*(greenpatch.spawn(Item.objects.count) for _ in range(5)))

        counts = IOLoop.current().run_sync(main)
        self.assertEqual(counts, [1] * 5)
