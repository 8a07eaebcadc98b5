from lazystore.cli import main

raise SystemExit(main())
