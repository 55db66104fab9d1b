"""Exchange with other model formats: ONNX export of a compiled graph (`onnx_export`) and ONNX import into the FX IR
(`onnx_import`)."""
