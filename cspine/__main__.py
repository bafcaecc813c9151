from cspine.cli import main

raise SystemExit(main())
