"""``python -m afpt`` is the ``afpt`` command."""

from afpt.cli import main

main()
