"""``mm1 report``: training run folders (or a sweep's) read into records, power-law fits of
final loss against compute and parameters, tables and plots (the command is ``cli.py``).
Reads only what runs wrote: imports neither ``scaling.estimate`` nor ``scaling.sweep``."""
