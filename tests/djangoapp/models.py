from django.db import models


class Counter(models.Model):
    name = models.CharField(max_length=50, unique=True)
    value = models.IntegerField(default=0)

    class Meta:
        app_label = "djangoapp"


class Parent(models.Model):
    name = models.CharField(max_length=50)

    class Meta:
        app_label = "djangoapp"


class Child(models.Model):
    parent = models.ForeignKey(Parent, on_delete=models.CASCADE)

    class Meta:
        app_label = "djangoapp"
