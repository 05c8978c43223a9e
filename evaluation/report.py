"""A report to look at: image grids (source | protected | clean edit | protected edit, for chosen prompts) and an
HTML page with the metric tables and the grids.

    python -m evaluation.report --src_dir photos --clean_edit_dir edits/clean --defend_edit_dirs edits/facelock \
        --protected_dirs protected/facelock --seed 0 --prompt_indices 0,5,13 --results results/ --output report/
"""

from __future__ import annotations

import argparse
import csv
import html
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from utils import UserError, atomic_write, list_images, load_image, read_prompts, run_script

from .runner import METRIC_CLASSES
from .walker import EditSet, edit_sets, images_by_name

LABEL = 18  # pixels of text above each row and column
MISSING = (200, 200, 200)


def tile(path: Path | None, size: int) -> Image.Image:
    """The image at `path` fitted into a white `size` square (grey where there is no image)."""
    canvas = Image.new("RGB", (size, size), (255, 255, 255) if path else MISSING)
    if path is not None:
        image = load_image(path)
        image.thumbnail((size, size), Image.LANCZOS)
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def grid(headers: Sequence[str], rows: Sequence[tuple[str, Sequence[Path | None]]], size: int = 192) -> Image.Image:
    """Columns titled by `headers`; each row is a label and one image path (or None) per column."""
    width = size * len(headers)
    sheet = Image.new("RGB", (width, LABEL + len(rows) * (size + LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, header in enumerate(headers):
        draw.text((c * size + 4, 2), header[: size // 6], fill=(0, 0, 0))
    for r, (label, paths) in enumerate(rows):
        top = LABEL + r * (size + LABEL)
        draw.text((4, top + 2), label, fill=(0, 0, 0))
        for c, path in enumerate(paths):
            sheet.paste(tile(path, size), (c * size, top + LABEL))
    return sheet


def protected_folder(root: Path | None, edit_set: EditSet) -> Path | None:
    """Where the protected photos of `edit_set` are: `root/budget_x` for a budget set, else `root` itself (or its
    only budget folder)."""
    if root is None:
        return None
    budget = edit_set.root.parent.name
    if budget.startswith("budget_") and (root / budget).is_dir():
        return root / budget
    if list_images(root):
        return root
    budgets = sorted(root.glob("budget_*"))
    return budgets[0] if len(budgets) == 1 else None


def csv_table(path: Path) -> str:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_short(c))}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _short(cell: str) -> str:
    try:
        return f"{float(cell):.4g}"
    except ValueError:
        return cell


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src_dir", required=True, help="the source photos")
    parser.add_argument("--clean_edit_dir", help="edits of the unprotected photos")
    parser.add_argument("--defend_edit_dirs", required=True, nargs="+", help="edits of protected photos, per method")
    parser.add_argument("--protected_dirs", nargs="*", default=[],
                        help="the protected photos of each method, in the order of --defend_edit_dirs "
                             "(main_defend.py's --output_dir)")
    parser.add_argument("--seed", required=True, type=int, help="the editing seed")
    parser.add_argument("--prompt_indices", default="0,5,13", help="prompts to show, e.g. 0,5,13")
    parser.add_argument("--prompts", help="the prompts file the edits were made with (default: the paper's 25)")
    parser.add_argument("--images", type=int, default=4, help="how many photos to show (the first by name)")
    parser.add_argument("--names", help="or exactly these photos, by name without extension: a,b,c")
    parser.add_argument("--results", help="an evaluation --output folder whose tables go on the page")
    parser.add_argument("--tile", type=int, default=192, help="pixels per image in the grids")
    parser.add_argument("--output", required=True, help="folder for the grids and index.html")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args.prompts)
    try:
        shown = [int(i) for i in args.prompt_indices.split(",")]
    except ValueError:
        raise UserError(f"--prompt_indices takes numbers separated by commas, got {args.prompt_indices!r}") from None
    if any(not 0 <= i < len(prompts) for i in shown):
        raise UserError(f"--prompt_indices must lie in 0..{len(prompts) - 1}")
    sources = images_by_name(Path(args.src_dir))
    if not sources:
        raise UserError(f"no images in {args.src_dir}")
    names = args.names.split(",") if args.names else sorted(sources)[: args.images]
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise UserError(f"no source photo named {', '.join(unknown)} in {args.src_dir}")
    if args.protected_dirs and len(args.protected_dirs) != len(args.defend_edit_dirs):
        raise UserError("give one --protected_dirs folder per --defend_edit_dirs folder, in the same order")
    protected_roots = [Path(p) for p in args.protected_dirs] or [None] * len(args.defend_edit_dirs)
    methods = [(s, protected_folder(root, s)) for folder, root in zip(args.defend_edit_dirs, protected_roots)
               for s in edit_sets(folder, args.seed)]
    clean = edit_sets(args.clean_edit_dir, args.seed, label="clean")[0] if args.clean_edit_dir else None

    headers = ["source", "protected"]
    for i in shown:
        headers += [f"clean: {prompts[i]}", f"protected: {prompts[i]}"]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    figures = []
    for name in names:
        rows = []
        for edit_set, protected in methods:
            paths = [sources[name], images_by_name(protected).get(name) if protected else None]
            for i in shown:
                paths.append(images_by_name(clean.root / f"prompt{i}").get(name) if clean else None)
                paths.append(images_by_name(edit_set.root / f"prompt{i}").get(name))
            rows.append((edit_set.label, paths))
        path = output / f"grid_{name}.png"
        sheet = grid(headers, rows, args.tile)
        atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
        figures.append(path.name)
        print(f"wrote {path}")

    tables = ""
    if args.results:
        for table in sorted(Path(args.results).glob("*.csv")):
            if table.stem in METRIC_CLASSES:
                tables += f"<h2>{html.escape(METRIC_CLASSES[table.stem].heading())}</h2>{csv_table(table)}"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>FaceLock evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>"
        f"<h1>FaceLock evaluation, seed {args.seed}</h1>"
        "<p>Grey tiles: no image. The arrow after each metric points the way a stronger defense moves it.</p>"
        + tables + "".join(f"<h2>{html.escape(f)}</h2><img src='{html.escape(f)}'>" for f in figures)
        + "</body></html>\n"
    )
    atomic_write(output / "index.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
    print(f"wrote {output / 'index.html'}")
    return 0


if __name__ == "__main__":
    run_script(main)
