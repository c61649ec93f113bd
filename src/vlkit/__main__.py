from vlkit.cli import main

raise SystemExit(main())
