"""Training loop, optimizer, learning-rate rule and metrics."""
