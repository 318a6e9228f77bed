"""Studies: settings x methods x seeds trained resumably and recorded under results/.

runner.py parses a study file and trains its runs (`quest study`; `quest sweep` too, over the
project's own upstream outputs: sweep.py); fanout.py trains them at once on Dask through
Prefect; table.py writes each study's table and figures from the records.
"""
