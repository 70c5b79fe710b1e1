"""An application that sets the garbage collector's thresholds as it loads."""

import gc

from wsgi_apps import gc_state

gc.set_threshold(1234, 7, 7)

__all__ = ["gc_state"]
