from routerd.ops.cli import main

raise SystemExit(main())
