from django.db import models


class World(models.Model):
    """The TechEmpower ``World`` table (created and filled by ``bench/peers.py``)."""

    randomnumber = models.IntegerField()

    class Meta:
        db_table = "World"
        managed = False
