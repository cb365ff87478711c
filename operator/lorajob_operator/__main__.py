"""`python -m lorajob_operator`: run the operator with its settings (LORAJOB_*).

Equivalent to `kopf run --standalone [--all-namespaces | -n NS ...] --liveness=...
-m lorajob_operator.kopf_app`, with the namespaces, liveness port and log level
taken from the settings, so the container needs no command-line flags. The settings
are loaded here, once, and handed to the handlers (handlers.register).
"""

from __future__ import annotations

import logging
import sys

import kopf

from lorajob_operator import handlers
from lorajob_operator.settings import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"lorajob-operator: {err}", file=sys.stderr)  # logging is not set up yet
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kopf's default registry: it holds kopf's own login handlers (the API client's
    # credentials) beside ours.
    handlers.register(settings)
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
