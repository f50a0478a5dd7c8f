"""Tooling around the node, never imported by it: the demo, a throw-away Orthanc, the
phantom generator, node processes, throw-away job tables and tiny ONNX models.

The tests, the benchmarks and ``denoise-node demo`` share these; the running node
(``node/``) does not depend on this package.  The CLI finds the demo through the
``denoise_node.commands`` entry-point group (see ``node.cli``).
"""
