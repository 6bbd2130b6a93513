from testlooper.cli.main import main

raise SystemExit(main())
