"""`python -m cachekit.eval ...` == `cachekit eval ...`; lets `accelerate launch -m cachekit.eval` shard an evaluation."""

import sys

from .cli import main

sys.exit(main())
