"""`python -m fastslm.models.demo`: the demo-model recipe (see recipe.py)."""

from .recipe import main

main()
