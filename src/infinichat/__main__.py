from infinichat.cli.main import main

raise SystemExit(main())
