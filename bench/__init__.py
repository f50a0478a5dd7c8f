"""Benchmarks against the peers (DCMTK, Orthanc, bare onnxruntime), one command each.

``python -m bench.ingest``, ``bench.inference``, ``bench.end_to_end``, ``bench.scale_out``;
see bench/README.md.  They need a source checkout with the test extras (onnx, pytest),
DCMTK, Orthanc and, for PostgreSQL figures, the server at DENOISE_NODE_TEST_POSTGRES_URL.
"""
