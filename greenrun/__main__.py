from greenrun.cli import main

raise SystemExit(main())
