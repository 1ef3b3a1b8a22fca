"""``python -m perturbscope``."""

from .cli import main

main()
