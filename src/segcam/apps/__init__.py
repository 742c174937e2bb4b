"""Applications built on the segcam library: the command line, batches, demos, evaluation, viewer.

Everything here calls the library's public API; the library (every module of ``segcam`` outside
``segcam.apps``) never imports an application. ``make lint`` checks this rule with import-linter.
"""
