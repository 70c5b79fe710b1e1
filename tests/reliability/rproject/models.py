"""The tables are created by the tests with plain SQL (rsupport.SCHEMA)."""

from django.db import models


class Item(models.Model):
    """One write: an item and PARTS parts, all in one transaction."""

    uid = models.CharField(max_length=64, unique=True)
    value = models.BigIntegerField()

    class Meta:
        db_table = "rp_item"
        managed = False


class Part(models.Model):
    item_uid = models.CharField(max_length=64)
    n = models.IntegerField()
    value = models.BigIntegerField()

    class Meta:
        db_table = "rp_part"
        managed = False


class Account(models.Model):
    id = models.IntegerField(primary_key=True)
    balance = models.BigIntegerField()

    class Meta:
        db_table = "rp_account"
        managed = False


class Transfer(models.Model):
    tid = models.CharField(max_length=64, unique=True)
    src = models.IntegerField()
    dst = models.IntegerField()
    amount = models.BigIntegerField()

    class Meta:
        db_table = "rp_transfer"
        managed = False
