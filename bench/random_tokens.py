#!/usr/bin/python3
"""Writes DIR/train.bin and DIR/val.bin of uniformly random byte tokens (uint16, little-endian):
benchmark input whose speed does not depend on the text. Usage: random_tokens.py DIR"""
import os
import random
import sys

random.seed(0)
for name, n in (("train.bin", 400000), ("val.bin", 40000)):
    with open(os.path.join(sys.argv[1], name), "wb") as f:
        f.write(bytes(random.getrandbits(8) if i % 2 == 0 else 0 for i in range(2 * n)))
