"""`python -m cachekit ...` == `cachekit ...`; lets `accelerate launch -m cachekit search ...` spread a search."""

import sys

from .cli import main

sys.exit(main())
