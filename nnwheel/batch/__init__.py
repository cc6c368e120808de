"""nnwheel batch: an installed model over a table of rows, here (`local.py`), on Spark or on Ray.

`job.py` says what is asked and runs it on an engine; `model.py` finds the installed model and its
`batch` module (the generated package's own entry point, which the workers run too); `reading.py` streams
the input, `output.py` puts the result in place only once it is complete, `workers.py` says what pip
installs on the workers.
"""
