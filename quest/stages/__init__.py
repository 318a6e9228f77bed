"""Pipeline stages: one function per step, taking a Config and Paths, writing files, returning metrics."""
