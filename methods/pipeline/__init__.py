"""The protection pipeline as a library, which every front end calls (defend.py, main_defend.py, the web page, the
benchmarks): the options and their checks (`options`), protecting photos and folders (`protect`), editing
(`editing`), the bookkeeping of batch jobs (`runs`), where a photo is attacked and how the perturbation goes back
(`placement`) and which photos a run reads (`photos`)."""
