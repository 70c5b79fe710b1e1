"""Django integration: the pooled MySQL backend and its helpers."""
