from dq3jax.train.run import main

raise SystemExit(main())
