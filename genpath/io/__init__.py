"""Reading and writing images at the I/O edge (numpy/PIL live only here)."""
