"""Running workflows: the scheduler, cache keys, caches and events."""
