"""One folder per pipeline stage; each `component.py` holds a thin KFP component over `neumo.stages`.

Importing a component needs only `kfp`: the library is imported inside the component bodies.
"""
