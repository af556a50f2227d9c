"""Benchmarks, run by `make bench` (python -m bench). Not tests: nothing here fails on speed.

- orders.py: realistic order changes (every AttributeValue type), as table writes, KDS docs
  and daemon records;
- fakes.py: in-memory AWS clients that count calls per route;
- child.py / baseline_child.py: our processor and kclpy's usual loop, driven through the pipe;
- b1.py: throughput through the protocol pipe, memory, and the py-spy profile of our child;
- b2.py: decode + unmarshal alone, against TypeDeserializer and Powertools;
- b3.py: end to end through the real daemon on the local stack (B3), AWS calls per record (B4).
"""
