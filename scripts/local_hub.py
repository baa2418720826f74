#!/usr/bin/env python
"""Start, stop or query the embedded local Hub, or publish stages: the same as ``esp-medsam hub ...``.

Usage: python scripts/local_hub.py start --root DIR [--port P] | stop --root DIR | status --root DIR | publish ...
"""

from __future__ import annotations

import argparse
import logging
import sys

import esp_medsam_hf
from esp_medsam_hf.commands import hub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_hub.py", description=hub.__doc__.splitlines()[0])
    hub.add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    esp_medsam_hf.register()
    return hub.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
