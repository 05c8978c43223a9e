"""`python -m evaluation.web`: start the page (see `evaluation.web.server`)."""

from utils import run_script

from .server import main

run_script(main)
