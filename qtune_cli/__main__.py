"""`python -m qtune_cli`: what torchrun and accelerate launch start (`torchrun --nproc-per-node 2 -m qtune_cli run CONFIG`),
and what `qtune run --gpus N` starts N times."""

import sys

try:
    from qtune_cli.main import main

    main()
except KeyboardInterrupt:
    # Ctrl-C reaches every process of a launch, possibly while it is still importing: the launcher
    # says so in one line, so each worker stops without a traceback.
    sys.exit(130)
