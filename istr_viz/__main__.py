from istr_viz.cli import main

raise SystemExit(main())
