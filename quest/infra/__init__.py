"""Infrastructure: errors, typed settings, paths, atomic files, progress and run locks. Imports
nothing else from quest."""
