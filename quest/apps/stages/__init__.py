"""Pipeline stages: one function per step: Config and Paths in, files and metrics out."""
