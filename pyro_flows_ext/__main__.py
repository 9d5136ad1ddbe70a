"""``python -m pyro_flows_ext``: the ``pyro-flows`` command."""

import sys

from pyro_flows_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
