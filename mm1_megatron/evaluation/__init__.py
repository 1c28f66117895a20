"""Few-shot evaluation: tasks read from their official files, metrics, generation, the CLI."""
