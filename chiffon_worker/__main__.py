"""`python -m chiffon_worker` is the `chiffon-worker` command."""

from chiffon_worker.cli import main

raise SystemExit(main())
