"""``python -m diffx``: the ``diffx`` command, for launchers that start a module (``torchrun -m diffx``,
``accelerate launch -m diffx``)."""

import sys

from diffx.cli import main

if __name__ == "__main__":
    sys.exit(main())
