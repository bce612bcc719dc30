"""`python -m nbcheckpoint` is the `nbcheckpoint` command."""
import sys

from .cli import main

sys.exit(main())
