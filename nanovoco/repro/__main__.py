"""`python -m nanovoco.repro`: the main job (run.py)."""
from nanovoco.repro.run import main

main()
