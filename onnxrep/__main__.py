from onnxrep.cli import main

raise SystemExit(main())
