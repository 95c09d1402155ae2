"""`python -m qtune_cli`: what torchrun and accelerate launch start (`torchrun --nproc-per-node 2 -m qtune_cli run CONFIG`)."""

from qtune_cli.main import main

main()
