"""``python -m edgevoice.bench``: the same as ``edgevoice bench``."""

from edgevoice.bench import main

raise SystemExit(main())
