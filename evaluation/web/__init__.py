"""The web page for people protecting their own photos: its state (`page`), its HTTP server (`server`) and its
static files; `python -m evaluation.web` (or `python defend.py --web`) starts it."""
