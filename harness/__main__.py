"""``python -m harness``: the ``sd-cxr`` command line (``harness.cli``)."""

from harness.cli import main

main()
