"""python -m research COMMAND: see research/commands.py."""
from research.commands import main

main()
