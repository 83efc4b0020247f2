"""A run's settings and its output directory: config, what OUT already holds, the
checkpoint, durable writes, progress and quiet output."""
