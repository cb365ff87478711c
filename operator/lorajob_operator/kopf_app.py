"""The operator for kopf's own command line: `kopf run -m lorajob_operator.kopf_app`.

`kopf run` imports a module and runs the handlers it registered with kopf's default
registry, so this entry point, like __main__.py, does its work when it runs: it loads
the settings (LORAJOB_*) and registers the handlers. `python -m lorajob_operator` is
the same operator with kopf's options (namespaces, liveness) taken from the settings.
"""

from __future__ import annotations

from lorajob_operator import handlers
from lorajob_operator.settings import load_settings

handlers.register(load_settings())
