"""The benchmark's Django app: TechEmpower-style endpoints on a ``World`` table.

Every configuration measured by ``bench/peers.py`` serves this same code;
only the settings taken from the environment differ (see ``settings.py``).
"""
