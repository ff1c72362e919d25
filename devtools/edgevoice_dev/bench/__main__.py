"""``python -m edgevoice_dev.bench``: the same as ``edgevoice bench``."""

from edgevoice_dev.bench import main

raise SystemExit(main())
