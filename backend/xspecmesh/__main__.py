from xspecmesh.cli import main

raise SystemExit(main())
