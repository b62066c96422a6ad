"""The shipped offline pairs (tiny, arith) and their build scripts; installed as the package data
`c2c.presets_data` so that `--preset` and the Python API find them however c2c is installed."""
