"""``mm1 sweep``: a sweep YAML expanded into one resolved config and launch file per run,
pruned by ``mm1 estimate``'s memory estimate, and the local runs run one after another
(the command is ``cli.py``). Imports ``scaling.estimate``, never ``scaling.report``."""
