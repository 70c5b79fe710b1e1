"""A tiny Django app for greenpatch's tests."""
