"""``mm1 estimate``: parameters, training FLOPs, memory per GPU and step time of a config
at a layout, and the valid layouts of a GPU count ranked by estimated step time (the
command is ``cli.py``). Imports nothing else of ``scaling``."""
