"""Speed benchmark of MoLE-Flow: ``python -m moleflow.benchmark --weights random|pretrained``.

* ``synthetic``: an MVTec-AD-sized synthetic dataset (15 classes, ~240 training and ~115 test
  PNGs of 700-1024 px per class, with masks), generated once in a process pool.
* ``limits``: the backbone alone, a FrEIA-style 8-block reference flow alone, and our flow alone,
  measured in the same process as the run they are compared with.
* ``timing``: the main configuration run end to end (``moleflow.runner.Run``, given a clock)
  with every phase timed: data check, decode, feature extraction, flow training, routing, memory,
  evaluation, output; end-to-end inference speed as the number of tasks grows; parameter growth;
  peak GPU and host memory.

``__main__`` puts it together, prints a summary with each figure as a ratio to its limit and the
issue's goals, and writes all of it as JSON.
"""
