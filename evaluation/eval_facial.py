"""FR: face-recognition similarity between each source photo and its edits (a face model of your choice judges).

    python -m evaluation.eval_facial --help
"""

from evaluation.runner import cli
from utils import run_script

if __name__ == "__main__":
    run_script(lambda: cli(["fr"], __doc__.split("\n\n")[0], name="fr"))
