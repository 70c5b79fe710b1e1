"""A tiny Django project served by `python -m greenpatch serve` in the reliability tests.

Everything about the database comes from the environment (see settings.py),
so each test can point one server process at its own private ``mariadbd``
with its own pool options.
"""
