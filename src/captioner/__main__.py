from captioner.cli.main import main

raise SystemExit(main())
