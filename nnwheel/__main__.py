"""`python -m nnwheel`: the same as the nnwheel command."""

import sys

from .cli import main

sys.exit(main())
