"""Small shared helpers of genpath's base layer: atomic writes, logging, quiet imports."""
