# PYTHON_ARGCOMPLETE_OK (shell completion: see crawler.cli.complete)
import sys

from .cli import main

sys.exit(main())
