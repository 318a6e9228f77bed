"""Studies: settings x methods x seeds trained resumably and recorded under results/.

spec.py reads a study file and plans its runs; runs.py takes one run from plan to record (the
shared upstream stages, its scratch root, training under its lock); runner.py is `quest study`
(fanout.py: the runs at once on Dask through Prefect); sweep.py is `quest sweep`, the same runs
over the project's own upstream outputs; table.py and figures.py write each study's table and
figures from the records.
"""
