"""``caveat-serve``: run the prediction server (settings from flags and ``CAVEAT_*`` variables)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from service.app import create_app
from service.server import serve
from service.settings import configure_logging, settings_from
from service.workers import supervise


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from(argv)
    configure_logging(settings.log_level)
    if settings.engine == "ray":
        try:
            from service.ray_serve import run  # the ray extra
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != "ray":
                raise
            print("caveat-serve: --engine ray needs Ray Serve: pip install '.[ray]'", file=sys.stderr)
            return 2
        return run(settings)
    if settings.workers > 1:
        return supervise(settings)
    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
