"""The embedded synthetic world (``world``) and its sequence builder (``sequences``)."""
