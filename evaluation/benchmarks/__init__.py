"""The benchmarks: each measures one question on real models and writes its tables, with the machine, the date and
the command, to a file of `evaluation/results/` (`--results`); `timing`, `crops` and `results` are what they share."""
