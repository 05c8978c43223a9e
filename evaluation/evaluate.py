"""All six metrics of the paper (PSNR, SSIM, LPIPS, CLIP-S, CLIP-I, FR) in one pass, every model loaded once.

    python -m evaluation.evaluate --src_dir photos --clean_edit_dir edits/clean \
        --defend_edit_dirs edits/facelock edits/encoder --seed 0 --output results/

`--metrics ...,psr` adds the protection success rate; with `--psr_gallery DIR` also FaceCloak's identification PSR
of the edits against that gallery (see `evaluation.eval_psr`).
"""

from evaluation.runner import METRIC_KEYS, cli
from utils import run_script

if __name__ == "__main__":
    run_script(lambda: cli(METRIC_KEYS, __doc__.split("\n\n")[0]))
