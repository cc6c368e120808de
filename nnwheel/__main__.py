"""`python -m nnwheel`: the same as the nnwheel command."""

from .cli import run

run()
