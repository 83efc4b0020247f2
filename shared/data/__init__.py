"""The data stage: a dataset directory (load, validate, convert, synthesise) and its
partition into nodes."""
