from opserve.cli import main

raise SystemExit(main())
