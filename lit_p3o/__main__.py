"""``python -m lit_p3o`` is the ``lit-p3o`` command."""

from lit_p3o.cli import main

main()
