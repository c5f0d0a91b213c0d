"""python -m graphgrow.cli: the command line (subprocess tests and job scripts use it)."""
import sys

from . import main

sys.exit(main())
