from openmind_bench.cli import main

raise SystemExit(main())
