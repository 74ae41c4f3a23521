"""``python -m afpt`` is the ``afpt`` command."""

from afpt.app.cli import main

main()
