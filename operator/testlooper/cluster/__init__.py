"""Shell: the Kubernetes operator (kopf). One module per resource, each thin: gather what is
observed, call the pure decisions in `testlooper.decisions`, apply what they return.

`app.run(options)` is what `testlooper operator` starts.
"""
