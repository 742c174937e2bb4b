"""``python -m segcam.apps.cli``: the same as the ``segcam`` command."""

import sys

from segcam.apps.cli import main

sys.exit(main())
