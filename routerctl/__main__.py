from routerctl.cli import main

raise SystemExit(main())
