"""The pure core: decoding, routing, mapping and error reading, with no I/O at all."""
